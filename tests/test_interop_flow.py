"""Flow-matching teachers: tiny random StableDiffusion3Pipeline folders that the tests build themselves (byte-level
CLIP tokenizers and a character-level T5 tokenizer written by the test, nothing downloaded) come in with their
components, sample as their pipelines do, and distil with SFD."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel  # noqa: E402
from transformers import T5TokenizerFast  # noqa: E402

from fewstep.denoiser import Denoiser  # noqa: E402
from fewstep.errors import FewstepError  # noqa: E402
from fewstep.interop import import_model  # noqa: E402
from fewstep.models import load_model  # noqa: E402
from fewstep.sampling import sample  # noqa: E402
from fewstep.flow_grid import FLOW_T_TOP, flow_scheduler_grid  # noqa: E402
from fewstep.schedule import Schedule  # noqa: E402
from test_cli import run  # noqa: E402
from test_interop_latent import byte_level_tokenizer, tiny_clip_config  # noqa: E402

PROMPTS = ["a red bicycle", "a cat on a mat", "two green apples"]


def char_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer whose unigram vocabulary is the printable ASCII characters: one token a character."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    return T5TokenizerFast(vocab=vocab + [(chr(c), -1.0) for c in range(33, 127)], extra_ids=0)


def tiny_clip(hidden: int, projection: int):
    tok = byte_level_tokenizer()
    return tok, CLIPTextModelWithProjection(tiny_clip_config(tok, hidden, projection_dim=projection)).eval()


def tiny_sd3(folder, seed=0, t5=True, scheduler=None, max_shard_size=None):
    torch.manual_seed(seed)
    tok1, te1 = tiny_clip(32, 32)
    tok2, te2 = tiny_clip(16, 16)
    tok3 = te3 = None
    if t5:
        tok3 = char_t5_tokenizer()
        te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=64, d_ff=37, d_kv=8, num_layers=2,
                                      num_heads=4)).eval()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=48, out_channels=4,
                                        pos_embed_max_size=16).eval()
    StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=tiny_vae(), text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
                             text_encoder_3=te3, tokenizer_3=tok3).save_pretrained(
                                 folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return folder


def tiny_vae(channels=4, shift=0.0609, scale=1.5035):
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                         latent_channels=channels, norm_num_groups=8, sample_size=16, shift_factor=shift,
                         scaling_factor=scale, use_quant_conv=False, use_post_quant_conv=False).eval()


def tiny_flux(folder, seed=2, guidance_embeds=True):
    """A FluxPipeline as FLUX.1-dev is laid out (guidance-distilled, dynamic shifting), at toy size."""
    torch.manual_seed(seed)
    tok1 = byte_level_tokenizer()
    te1 = CLIPTextModel(tiny_clip_config(tok1)).eval()
    tok2 = char_t5_tokenizer()
    te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=64, d_ff=37, d_kv=8, num_layers=2,
                                  num_heads=4)).eval()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6)).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=sched, vae=tiny_vae(4, 0.1159, 0.3611), text_encoder=te1, tokenizer=tok1,
                 text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer).save_pretrained(folder)
    return folder


def pipeline(folder):
    index = json.loads((folder / "model_index.json").read_text())
    if index["_class_name"] == "FluxPipeline":
        pipe = FluxPipeline.from_pretrained(folder)
    else:
        extra = {} if index["text_encoder_3"][0] else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    sd3, flux = tiny_sd3(root / "sd3"), tiny_flux(root / "flux")
    # saved in shards, as the large models are
    clip_only = tiny_sd3(root / "sd3-no-t5", seed=1, t5=False, max_shard_size="50KB")
    assert (clip_only / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return {"root": root, "sd3": sd3, "sd3-no-t5": clip_only, "sd3-f": import_model(sd3, root / "sd3-f"),
            "sd3-no-t5-f": import_model(clip_only, root / "sd3-no-t5-f"), "flux": flux,
            "flux-f": import_model(flux, root / "flux-f", resolution=16)}


@pytest.mark.parametrize("shift,dynamic", [(3.0, False), (1.0, False), (None, True)])
def test_the_flow_grid_is_the_schedulers(shift, dynamic):
    """flow_scheduler_grid reproduces FlowMatchEulerDiscreteScheduler.set_timesteps bit for bit (static shift,
    none, Flux's dynamic shift with mu), its t = 1 taken at FLOW_T_TOP."""
    if dynamic:
        sched, mu = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 0.8
    else:
        sched, mu = FlowMatchEulerDiscreteScheduler(shift=shift), None
    for n in (1, 4, 28):
        sched.set_timesteps(n, mu=mu) if dynamic else sched.set_timesteps(n)
        sigmas, t = flow_scheduler_grid(n, 1000, shift or 1.0, mu)
        assert t == sched.sigmas[:-1].tolist() and len(sigmas) == n + 1 and sigmas[-1] == 0
        expect = sched.sigmas[:-1].double().clamp(max=FLOW_T_TOP)
        assert torch.equal(sigmas[:-1], expect / (1 - expect))


def test_flow_denoiser_is_exact_on_gaussian_data():
    """For x0 ~ N(0, s²), a network that returns the exact velocity E[ε − x0 | x_t] gives the Denoiser's exact
    posterior mean D(x, σ) = s²/(s² + σ²)·x at every σ, and its time input is 1000·t."""
    s = 0.7

    class ExactVelocity(torch.nn.Module):
        config = {"num_classes": 0}

        def forward(self, x_t, timestep, step=None, class_labels=None, return_features=False):
            t = (timestep.double() / 1000).reshape(-1, 1)
            a, b = 1 - t, t  # x_t = a·x0 + b·ε
            x0 = a * s**2 / (a**2 * s**2 + b**2) * x_t.double()
            eps = (x_t.double() - a * x0) / b
            return (eps - x0).float()

    den = Denoiser(ExactVelocity(), Schedule.flow(3.0), "flow")
    x = torch.randn(5, 3, dtype=torch.float32)
    for sigma in (0.01, 0.5, 3.0, 40.0):
        d = den(x * (1 + sigma), sigma)
        assert torch.allclose(d.double(), s**2 / (s**2 + sigma**2) * x.double() * (1 + sigma), rtol=1e-5, atol=1e-6)
    assert den.time_input(torch.tensor([3.0]))[0].item() == pytest.approx(750.0)
    with pytest.raises(FewstepError, match="flow schedule"):
        Denoiser(ExactVelocity(), Schedule.edm(), "flow")


def test_import_lists_the_encoders_and_the_flow_sampler(models):
    card = load_model(models["sd3-f"]).card
    assert set(card["components"]) == {"vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                       "tokenizer_2", "tokenizer_3"}
    assert card["components"]["vae"]["shift_factor"] == pytest.approx(0.0609)
    assert card["components"]["text_encoder_3"]["class"] == "T5EncoderModel"
    assert card["sampler"]["grid"] == "flow" and card["sampler"]["flow"] == {"T": 1000, "shift": 3.0, "rule": "scheduler"}
    assert card["sampler"]["nfe"] == 28 and card["text"]["guidance"] == 7.0
    assert card["text"]["encoders"] == {"kind": "sd3", "joint_dim": 64, "max_sequence_length": 256}
    assert card["denoiser"]["param"] == "flow" and card["net"]["type"] == "diffusers-sd3-transformer"
    assert "text_encoder_3" not in load_model(models["sd3-no-t5-f"]).card["components"]


def _latents(seed, n=3):
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["sd3", "sd3-no-t5"])
def test_sd3_equals_its_pipeline(models, name):
    """`fewstep sample` with the card's defaults is StableDiffusion3Pipeline's default call (28 Euler steps of its
    FlowMatchEulerDiscreteScheduler from t = 1, guidance 7) on the same latents and prompts; and the decoded
    images at 5 steps and guidance 3 from a seed."""
    pipe, model = pipeline(models[name]), load_model(models[f"{name}-f"])
    lat = _latents(3)
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=lat.clone(), output_type="latent", height=16, width=16).images
    x = sample(model, 3, noise=lat, prompts=PROMPTS, progress=False, decode=False)
    diff, scale = (x - ref).abs().max().item(), ref.abs().max().item()
    print(f"SD3 ({name}), 28 steps: max |fewstep - pipeline| = {diff:.3g} on latents of max {scale:.3g}")
    assert diff <= 1e-5 * scale
    with torch.no_grad():  # decoded images, as the pipeline decodes them (the autoencoder's shift factor)
        ref = pipe(PROMPTS[0], num_inference_steps=5, guidance_scale=3.0, output_type="pt", height=16, width=16,
                   num_images_per_prompt=2, generator=torch.Generator().manual_seed(8)).images
    x = sample(model, 2, seed=8, nfe=5, prompts=PROMPTS[:1], guidance=3.0, progress=False)
    assert ((x / 2 + 0.5).clamp(0, 1) - ref).abs().max().item() <= 5e-6


def test_other_solvers_and_their_refusals(models, capsys):
    """DPM-Solver++ runs on the flow grid; a solver that would cancel the state at t = 1 takes a polynomial grid
    by default and is refused on --grid flow by name."""
    model = load_model(models["sd3-no-t5-f"])
    for solver in ("dpmpp2m", "dpmpp3m", "heun", "euler"):
        nfe = 7 if solver == "heun" else 6
        x = sample(model, 2, nfe=nfe, sampler=solver, prompts=PROMPTS[:1], progress=False, decode=False)
        assert torch.isfinite(x).all() and x.abs().max() < 20
    with pytest.raises(FewstepError, match="sampler 'heun' would cancel"):
        sample(model, 2, nfe=7, sampler="heun", grid="flow", prompts=PROMPTS[:1], progress=False)
    assert run(["sample", models["sd3-no-t5-f"], "--n", 2, "--sampler", "euler", "--grid", "flow",
                "--prompt", "a cat", "--out", models["root"] / "refused.npz"]) == 2
    assert "--grid flow: starts at pure noise" in capsys.readouterr().err


def test_sfd_on_sd3(models, tmp_path):
    """SFD distils the SD3 teacher (data free, on prompts; the transformer's blocks recomputed in the backward
    pass): the student shares its encoders, samples at its NFE, saves and loads to the same samples, and goes on
    to the 1-NFE stage; SFDDM is refused with the reason."""
    import fewstep

    teacher = load_model(models["sd3-no-t5-f"])
    student = fewstep.distill_sfd(teacher, tmp_path / "sfd", nfe=3, prompts=PROMPTS, iters=2, batch=4,
                                  progress=False, grad_checkpoint=True)
    assert student.card["text"]["encoders"]["kind"] == "sd3" and student.card["sampler"]["nfe"] == 3
    assert student.card["training"]["peak_memory_mb"] > 0
    x = sample(student, 3, seed=2, prompts=PROMPTS, progress=False)
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    assert torch.equal(sample(load_model(tmp_path / "sfd"), 3, seed=2, prompts=PROMPTS, progress=False), x)
    one = fewstep.distill_sfd(student, tmp_path / "one", stage2=True, prompts=PROMPTS, iters=1, batch=4, progress=False)
    assert one.card["sampler"]["nfe"] == 1
    assert torch.isfinite(sample(one, 2, prompts=PROMPTS, progress=False)).all()
    with pytest.raises(FewstepError, match="text-to-image model: SFDDM and progressive distillation train on data"):
        fewstep.distill_sfddm(teacher, "digits", tmp_path / "sfddm", steps=4, iters=1, batch=4)
    with pytest.raises(FewstepError, match="flow-matching teacher has no VP step table"):
        teacher.denoiser.discrete_view()  # what SFDDM of a flow model without text would need


def test_refusals_name_what_is_not_run(models, tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler as F
    karras = tiny_sd3(tmp_path / "karras", t5=False, scheduler=F(shift=3.0, use_karras_sigmas=True))
    assert run(["import", karras, "--out", tmp_path / "karras-f"]) == 2
    assert "use_karras_sigmas=True (Karras sigmas) is not reproduced" in capsys.readouterr().err
    index = json.loads((models["sd3"] / "model_index.json").read_text())
    folder = tmp_path / "ip"
    import shutil
    shutil.copytree(models["sd3"], folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "image_encoder": ["transformers", "X"]}))
    assert run(["import", folder, "--out", tmp_path / "ip-f"]) == 2
    assert "image_encoder (an image encoder (IP-Adapter))" in capsys.readouterr().err
    assert math.isfinite(np.float32(FLOW_T_TOP)) and np.float32(FLOW_T_TOP) == 1.0
    assert run(["info", models["flux-f"]]) == 0
    out = capsys.readouterr().out
    assert "FLUX's encoders: CLIPTextModel in text_encoder/, T5EncoderModel in text_encoder_2/" in out
    assert "guidance 3.5 as the transformer's input" in out and "flow grid from pure noise" in out


FRESH_MANY = r'''
import json, sys
sys.modules["fewstep"] = None
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
out = []
for job in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(job["folder"], custom_pipeline=job["folder"] + "/pipeline.py",
                                             trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    ref = load_file(job["expected"])["x"]
    x = pipe(batch_size=len(ref), seed=job["seed"], output_type="raw", prompt=job["prompts"]).images
    out.append([float((x - ref).abs().max()), float(ref.abs().max())])
print(json.dumps(out))
'''


def test_flow_models_export_round_trip(models, tmp_path):
    """An SD3 SFD-v student (with T5) and the imported Flux teacher itself (the flow grid from t = 1, packed
    latents, the guidance input), exported: a process without fewstep loads each folder with diffusers, encodes
    the prompts with the pipeline's encoders, and returns what `fewstep sample` returns for the same seed."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    import fewstep

    # SFD-v: its step condition (per-block, the authors' kind) folds into the exported transformer's biases
    student = fewstep.distill_sfd(load_model(models["sd3-f"]), tmp_path / "sfd", nfe=[1, 2], prompts=PROMPTS,
                                  iters=2, batch=4, progress=False)
    assert student.card["net"]["step_condition"] == "authors"
    cases = {"sd3-student": (student, 2), "flux-teacher": (load_model(models["flux-f"]), 4)}
    jobs = []
    for name, (model, nfe) in cases.items():
        folder = fewstep.export_model(model, tmp_path / name, nfe=nfe)
        index = json.loads((folder / "model_index.json").read_text())
        assert index["unet"] == ["diffusers", model.denoiser.net.CLASS]
        assert index["tokenizer_2" if name.startswith("flux") else "tokenizer_3"][1] in ("T5Tokenizer", "T5TokenizerFast")
        assert index["sampler"]["param"] == "flow"
        assert index["sampler"]["scale"] == ("sigma" if name.endswith("student") else "flow")
        x = sample(model, 3, seed=4, nfe=nfe, prompts=PROMPTS[:2], progress=False)
        save_file({"x": x.contiguous()}, str(tmp_path / f"{name}.safetensors"))
        jobs.append({"folder": str(folder), "expected": str(tmp_path / f"{name}.safetensors"), "seed": 4,
                     "prompts": PROMPTS[:2]})
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([sys.executable, "-c", FRESH_MANY, json.dumps(jobs)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, (diff, scale) in zip(cases, json.loads(r.stdout.strip().splitlines()[-1])):
        print(f"{name}: export round trip max |diff| = {diff:.3g} (scale {scale:.3g})")
        assert diff <= 1e-5


def test_flux_equals_its_pipeline(models):
    """`fewstep sample` on an imported FluxPipeline is the pipeline's default call (28 steps of
    linspace(1, 1/28) shifted by the resolution's mu, the guidance scale 3.5 as the transformer's input) from the
    same latents, packed as the pipeline packs them; and again at 4 steps and guidance 5 from a seed."""
    pipe, model = pipeline(models["flux"]), load_model(models["flux-f"])
    card = model.card
    assert card["net"]["type"] == "diffusers-flux-transformer" and card["data"]["latent_shape"] == [4, 8, 8]
    assert card["sampler"]["flow"]["rule"] == "pipeline" and "mu" in card["sampler"]["flow"]
    assert card["text"]["encoders"] == {"kind": "flux", "max_sequence_length": 512, "embedded_guidance": True}
    assert card["text"]["guidance"] == 3.5
    lat = _latents(5)
    packed = FluxPipeline._pack_latents(lat.clone(), 3, 4, 8, 8)
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=packed, output_type="latent", height=16, width=16).images
    ref = FluxPipeline._unpack_latents(ref, 16, 16, pipe.vae_scale_factor)
    x = sample(model, 3, noise=lat, prompts=PROMPTS, progress=False, decode=False)
    diff, scale = (x - ref).abs().max().item(), ref.abs().max().item()
    print(f"Flux, 28 steps: max |fewstep - pipeline| = {diff:.3g} on latents of max {scale:.3g}")
    assert diff <= 1e-5 * scale
    with torch.no_grad():
        ref = pipe(PROMPTS[1], num_inference_steps=4, guidance_scale=5.0, output_type="pt", height=16, width=16,
                   num_images_per_prompt=2, generator=torch.Generator().manual_seed(8)).images
    x = sample(model, 2, seed=8, nfe=4, prompts=PROMPTS[1:2], guidance=5.0, progress=False)
    assert ((x / 2 + 0.5).clamp(0, 1) - ref).abs().max().item() <= 5e-6


def test_sfd_on_flux_keeps_the_guidance_input(models, tmp_path):
    """A guidance-distilled teacher takes its scale as an input: SFD's student is given the same scale (not the
    prompt alone at 1), its card says so, it samples, and its export does the same; the 1-NFE stage keeps it
    too."""
    import fewstep

    teacher = load_model(models["flux-f"])
    student = fewstep.distill_sfd(teacher, tmp_path / "sfd", nfe=3, m=1, prompts=PROMPTS, guidance=4.0, iters=2,
                                  batch=4, progress=False)
    assert student.card["text"]["guidance"] == 4.0 and student.denoiser.guidance == 4.0
    x = sample(student, 3, seed=1, prompts=PROMPTS, progress=False)
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    # exported, the student's pipeline gives its transformer the same guidance input
    from fewstep.interop.diffusers_pipeline import load_pipeline
    exported = load_pipeline(fewstep.export_model(student, tmp_path / "export"))
    exported.set_progress_bar_config(disable=True)
    raw = exported(batch_size=3, seed=1, prompt=PROMPTS, output_type="raw").images
    assert (raw - x).abs().max() <= 1e-5
    one = fewstep.distill_sfd(student, tmp_path / "one", stage2=True, prompts=PROMPTS, iters=1, batch=4,
                              progress=False)
    assert one.card["text"]["guidance"] == 4.0
