"""LoRA students: an adapter on the teacher's own weights (one set of weights in memory), which starts as the
teacher, trains alone, comes back from its checkpoint, fuses to the same function, and loads into the teacher's
own diffusers pipeline."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
from diffusers import StableDiffusionPipeline  # noqa: E402

import fewstep  # noqa: E402
from fewstep.distill.trajectory_cache import module_digest  # noqa: E402
from fewstep.errors import FewstepError  # noqa: E402
from fewstep.interop import import_model  # noqa: E402
from fewstep.lora import fuse_lora, lora_parameters  # noqa: E402
from fewstep.models import load_model  # noqa: E402
from fewstep.sampling import sample  # noqa: E402
from fewstep.sfd.config import SFDConfig  # noqa: E402
from fewstep.sfd.method import SFD  # noqa: E402
from fewstep.train import StepContext, TrainConfig, Trainer  # noqa: E402
from test_cli import run  # noqa: E402
from test_interop_latent import PROMPTS, tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folder = tiny_sd(root / "sd", seed=3)
    return {"root": root, "sd": folder, "sd-f": import_model(folder, root / "sd-f")}


def test_a_lora_student_starts_as_its_teacher_on_the_teachers_weights(sd, tmp_path):
    """The adapter's B starts at zero: with an Euler teacher and K = 1 the loss is zero. The student is the
    teacher's network (no copy), only the adapter trains, and the teacher it sees (the adapter off) hashes as the
    teacher without one, so trajectory caches are shared with full-copy runs."""
    teacher = load_model(sd["sd-f"])
    digest = module_digest(load_model(sd["sd-f"]).denoiser)
    method = SFD(teacher, SFDConfig(nfe=[2], afs=False, m=0, teacher_solver="euler", lora=4), prompts=PROMPTS,
                 guidance=1.0)
    assert method.student.net is teacher.denoiser.net
    trainable = [p for p in method.trainable().parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == lora_parameters(method.student.net) > 0
    assert module_digest(method.traj.den) == digest
    tr = Trainer(method, TrainConfig(steps=1, batch=4, progress=False), tmp_path / "a")
    logs = method.train_step(StepContext(tr), None, torch.Generator().manual_seed(0))
    assert logs["loss_step0"] == 0.0 and logs["loss_step1"] == 0.0
    method.release()
    assert "lora" not in teacher.denoiser.net.config and module_digest(teacher.denoiser) == digest


def test_lora_students_round_trip_and_fuse(sd, tmp_path):
    """distill_sfd(lora=...) trains the adapter alone, gives the teacher back as it came, and the student comes
    back from its folder to the same samples; fusing the adapter into the weights samples the same (to float
    rounding); SFD-v trains its step condition beside the adapter."""
    teacher = load_model(sd["sd-f"])
    before = sample(teacher, 2, prompts=PROMPTS, nfe=4, progress=False)
    student = fewstep.distill_sfd(teacher, tmp_path / "sfd", nfe=2, lora=4, lora_alpha=8, prompts=PROMPTS, iters=3,
                                  batch=4, progress=False)
    assert student.card["net"]["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}
    assert torch.equal(sample(teacher, 2, prompts=PROMPTS, nfe=4, progress=False), before)
    x = sample(student, 3, seed=1, prompts=PROMPTS, progress=False)
    assert torch.equal(sample(load_model(tmp_path / "sfd"), 3, seed=1, prompts=PROMPTS, progress=False), x)
    b = [v for k, v in student.denoiser.net.state_dict().items() if "lora_B" in k]
    assert b and any(v.abs().max() > 0 for v in b)  # the adapter learnt
    fused = load_model(tmp_path / "sfd")
    fuse_lora(fused.denoiser.net)
    assert not any("lora" in k for k in fused.denoiser.net.state_dict())
    assert (sample(fused, 3, seed=1, prompts=PROMPTS, progress=False) - x).abs().max() <= 1e-5
    sfdv = fewstep.distill_sfd(teacher, tmp_path / "sfdv", nfe=[1, 2], lora=2, prompts=PROMPTS, iters=2, batch=4,
                               progress=False)
    assert sfdv.card["net"]["step_condition"] == "authors" and "lora" in sfdv.card["net"]
    assert teacher.denoiser.net.step_cond is None and "lora" not in teacher.denoiser.net.config


def test_a_lora_export_loads_into_the_teachers_pipeline(sd, tmp_path):
    """The export carries the adapter as a diffusers LoRA file: StableDiffusionPipeline.load_lora_weights puts
    it into the teacher's own pipeline, whose UNet then computes the student's (fused or not); the folder's own
    pipeline (the adapter fused) reproduces `fewstep sample`."""
    from fewstep.interop.diffusers_pipeline import load_pipeline
    student = fewstep.distill_sfd(load_model(sd["sd-f"]), tmp_path / "sfd", nfe=2, lora=4, prompts=PROMPTS,
                                  iters=2, batch=4, progress=False)
    folder = fewstep.export_model(student, tmp_path / "export")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["sampler"]["lora"]["file"] == "lora/pytorch_lora_weights.safetensors"
    assert "load_lora_weights" in (folder / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(sd["sd"], safety_checker=None)
    pipe.load_lora_weights(str(folder / "lora"))
    unet = student.denoiser.net.unet.eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0, 80.0])
    ctx = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ctx).sample
        teacher_out = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        pipe.disable_lora()
        base = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        pipe.enable_lora()
        pipe.fuse_lora()
        fused = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    assert (teacher_out - want).abs().max() <= 1e-5 and (fused - want).abs().max() <= 1e-5
    assert (base - want).abs().max() > 1e-4  # the adapter is what makes the difference
    expected = sample(student, 3, seed=4, prompts=PROMPTS[:2], progress=False)
    exported = load_pipeline(folder)
    exported.set_progress_bar_config(disable=True)
    x = exported(batch_size=3, seed=4, prompt=PROMPTS[:2], output_type="raw").images
    assert (x - expected).abs().max() <= 1e-5


def test_lora_refusals_read_as_one_line(sd, tmp_path, capsys):
    assert run(["distill", "sfd", "--teacher", "digits-teacher", "--lora", 4, "--iters", 1, "--out",
                tmp_path / "own", "--no-progress"]) == 2
    assert "has no diffusers model to adapt" in capsys.readouterr().err
    with pytest.raises(FewstepError, match="the 1-NFE stage trains a full copy"):
        SFDConfig(nfe=[2], stage2=True, lora=4)
    with pytest.raises(FewstepError, match="give the adapter's rank with lora=RANK"):
        SFDConfig(nfe=[2], lora_alpha=8)
    with pytest.raises(FewstepError, match="no module named nope"):
        fewstep.distill_sfd(load_model(sd["sd-f"]), tmp_path / "x", nfe=2, lora=2, lora_targets="to_q,nope",
                            prompts=PROMPTS, iters=1, batch=4, progress=False)


def test_a_flow_transformer_takes_a_lora_too(tmp_path):
    """SD3's transformer: the adapter trains on the attention projections and its LoRA file loads into
    StableDiffusion3Pipeline, whose transformer then computes the student's."""
    from diffusers import StableDiffusion3Pipeline
    from test_interop_flow import tiny_sd3
    folder = tiny_sd3(tmp_path / "sd3", t5=False)
    student = fewstep.distill_sfd(fewstep.import_model(folder, tmp_path / "sd3-f"), tmp_path / "sfd", nfe=2, lora=2,
                                  prompts=PROMPTS, iters=2, batch=4, m=1, progress=False)
    out = fewstep.export_model(student, tmp_path / "export")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(out / "lora"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 300.0])
    ctx, pooled = torch.randn(2, 272, 64, generator=g), torch.randn(2, 48, generator=g)
    with torch.no_grad():
        want = student.denoiser.net.transformer.eval()(x, ctx, pooled, t, return_dict=False)[0]
        got = pipe.transformer(x, ctx, pooled, t, return_dict=False)[0]
    assert (got - want).abs().max() <= 1e-5
