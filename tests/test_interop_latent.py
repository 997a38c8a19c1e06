"""Latent and text-to-image teachers: tiny random StableDiffusionPipeline and LDMPipeline folders that the tests
build themselves (a CLIP tokenizer whose byte-level vocabulary the test writes, nothing downloaded) come in
with their components, sample as their pipelines do, distil (SFD on prompts; SFDDM and progressive
distillation on encoded images), and go back out as diffusers folders a process without fewstep runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, LDMPipeline,  # noqa: E402
                       StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel, VQModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from fewstep.sfd.config import SFDConfig  # noqa: E402
from fewstep.sfd.method import SFD  # noqa: E402
from fewstep.errors import FewstepError  # noqa: E402
from fewstep.interop import import_model  # noqa: E402
from fewstep.models import load_model  # noqa: E402
from fewstep.sampling import sample  # noqa: E402
from fewstep.train import StepContext, TrainConfig, Trainer  # noqa: E402
from test_cli import run  # noqa: E402

PROMPTS = ["a red bicycle", "a cat on a mat", "two green apples"]


def byte_level_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer with a vocabulary of single byte-level characters (GPT-2's byte-to-unicode map) and no
    merges: every prompt tokenizes, one token a character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip_config(tok: CLIPTokenizer, hidden_size: int = 32, **extra) -> CLIPTextConfig:
    """A two-layer CLIP text encoder's config over the tokenizer's vocabulary, as every tiny pipeline here has."""
    n = len(tok)
    return CLIPTextConfig(vocab_size=n, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1,
                          pad_token_id=n - 1, **extra)


def tiny_sd(folder, seed=0, scheduler=None, in_channels=4):
    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    text = CLIPTextModel(tiny_clip_config(tok)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, sample_size=16).eval()
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def tiny_ldm(folder, seed=1):
    torch.manual_seed(seed)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=3,
                 num_vq_embeddings=32, norm_num_groups=8, vq_embed_dim=3, sample_size=16).eval()
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8).eval()
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    sd, ldm = tiny_sd(root / "sd"), tiny_ldm(root / "ldm")
    return {"root": root, "sd": sd, "ldm": ldm, "sd-f": import_model(sd, root / "sd-f"),
            "ldm-f": import_model(ldm, root / "ldm-f")}


def test_import_lists_every_component_with_its_hash(models):
    card = load_model(models["sd-f"]).card
    comps = card["components"]
    assert set(comps) == {"vae", "text_encoder", "tokenizer"}
    assert comps["vae"]["class"] == "AutoencoderKL" and comps["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert all(len(c["sha256"]) == 64 and (models["sd-f"] / c["folder"]).is_dir() for c in comps.values())
    assert card["data"]["shape"] == [3, 16, 16] and card["data"]["latent_shape"] == [4, 8, 8]
    assert card["net"]["type"] == "diffusers-unet2d-cond" and card["text"]["guidance"] == 7.5
    ldm = load_model(models["ldm-f"]).card
    assert ldm["components"]["vae"]["class"] == "VQModel" and "text" not in ldm
    assert ldm["data"]["latent_shape"] == [3, 8, 8]


def _latents(seed):
    return torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m"])
def test_stable_diffusion_equals_its_pipeline(models, solver):
    """The imported teacher with fewstep's DDIM (the card's default: the folder's DDIMScheduler) and
    DPM-Solver++(2M) equals StableDiffusionPipeline with the matching scheduler on the same latents, prompts
    and guidance, on images in [0, 1]."""
    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], safety_checker=None)
    if solver == "dpmpp2m":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    lat = _latents(3)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=10, guidance_scale=7.5, latents=lat.clone(), output_type="pt",
                   height=16, width=16).images
    x = sample(load_model(models["sd-f"]), 3, noise=lat, nfe=10, sampler=solver, prompts=PROMPTS, progress=False)
    diff, scale = ((x / 2 + 0.5).clamp(0, 1) - ref).abs().max().item(), ref.abs().max().item()
    print(f"Stable Diffusion, {solver}: max |fewstep - pipeline| = {diff:.3g} (images in [0, 1], max {scale:.3g})")
    assert diff <= 5e-6
    # the seed draws the pipeline's latents too
    with torch.no_grad():
        ref = pipe(PROMPTS[0], num_inference_steps=10, guidance_scale=3.0, output_type="pt", height=16, width=16,
                   num_images_per_prompt=2, generator=torch.Generator().manual_seed(8)).images
    x = sample(load_model(models["sd-f"]), 2, seed=8, nfe=10, sampler=solver, prompts=PROMPTS[:1], guidance=3.0,
               progress=False)
    assert ((x / 2 + 0.5).clamp(0, 1) - ref).abs().max().item() <= 5e-6


def test_ldm_equals_its_pipeline(models):
    pipe = LDMPipeline.from_pretrained(models["ldm"])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=10,
                   output_type="np").images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2)
    x = sample(load_model(models["ldm-f"]), 3, seed=5, nfe=10, progress=False)
    diff = ((x / 2 + 0.5).clamp(0, 1) - ref).abs().max().item()
    print(f"LDM, ddim: max |fewstep - pipeline| = {diff:.3g} (images in [0, 1])")
    assert diff <= 5e-6 and x.shape == (3, 3, 16, 16)
    latents = sample(load_model(models["ldm-f"]), 3, seed=5, nfe=10, progress=False, decode=False)
    assert latents.shape == (3, 3, 8, 8)


def test_guidance_is_one_batched_call(models):
    """uncond + W·(cond − uncond) from a single network call on the doubled batch; W = 1 is the prompt alone."""
    den = load_model(models["sd-f"]).denoiser
    calls = []
    hook = den.net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    text = den.encode_prompts(PROMPTS, "", guidance=5.0)
    x, labels = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    with torch.no_grad():
        guided = den(x, 2.0, class_labels=labels, text=text)
        cond = den(x, 2.0, class_labels=labels, text=text.with_guidance(1.0))
        uncond = den(x, 2.0, class_labels=labels, text=den.encode_prompts([""] * 3, "", guidance=1.0))
    hook.remove()
    assert calls == [6, 3, 3]
    assert torch.allclose(guided, uncond + 5.0 * (cond - uncond), atol=1e-4)  # float32 rounding of 5·(c − u)


def test_sfd_on_a_text_teacher(models, tmp_path):
    """A teacher copy at guidance 1 with an Euler teacher and K = 1 has zero loss; the guided teacher is not its
    copy; the batch's prompts are drawn from the list and the trajectory cache keys on them."""
    teacher = load_model(models["sd-f"])
    cfg = SFDConfig(nfe=[2], afs=False, m=0, teacher_solver="euler")
    method = SFD(teacher, cfg, prompts=PROMPTS, guidance=1.0)
    tr = Trainer(method, TrainConfig(steps=1, batch=4, progress=False), tmp_path / "a")
    logs = method.train_step(StepContext(tr), None, torch.Generator().manual_seed(0))
    assert logs["loss_step0"] == 0.0 and logs["loss_step1"] == 0.0
    teacher_text, student_text = method._last[6:8]
    assert set(teacher_text.prompts) <= set(PROMPTS) and student_text.guidance == 1.0
    assert method.student.guidance == 1.0 and teacher.denoiser.guidance == 7.5  # the loaded teacher is left alone
    guided = SFD(load_model(models["sd-f"]), SFDConfig(nfe=[2], afs=False, m=0, teacher_solver="euler"),
                 prompts=PROMPTS, guidance=7.5)
    tr = Trainer(guided, TrainConfig(steps=1, batch=4, progress=False), tmp_path / "b")
    assert guided.train_step(StepContext(tr), None, torch.Generator().manual_seed(0))["loss_step1"] > 0
    key = guided.traj.setup(guided._last[6])  # the key of the batch's trajectories names its prompts
    assert key["guidance"] == 7.5 and len(key["prompts_sha256"]) == 64
    card = guided.card()
    assert card["text"]["distilled_guidance"] == 7.5 and card["method"]["prompts"]["count"] == 3
    with pytest.raises(FewstepError, match="not text-conditioned"):
        SFD(load_model("digits-teacher"), SFDConfig(nfe=[2]), prompts=PROMPTS)
    # the authors' σ_min for Stable Diffusion
    assert float(guided.grids[2][0][-1]) == pytest.approx(0.1)


def test_data_methods_encode_images_once_and_refuse_text_teachers(models, tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        arr = (torch.rand((16, 16, 3), generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(images / f"{i}.png")
    common = ["--data", images, "--batch", 4, "--no-progress", "--ckpt-every", 0]
    assert run(["distill", "sfddm", "--teacher", models["ldm-f"], "--steps", 4, "--iters", 2, "--out",
                tmp_path / "sfddm", *common]) == 0
    assert run(["distill", "progressive", "--teacher", models["ldm-f"], "--start-steps", 8, "--steps", 4, "--iters", 1,
                "--out", tmp_path / "pd", *common]) == 0
    first = load_model(tmp_path / "sfddm").card["data"]["latents"]
    second = load_model(tmp_path / "pd").card["data"]["latents"]
    assert first["cached"] is False and second["cached"] is True and first["shape"] == [3, 8, 8]
    for name in ("sfddm", "pd"):
        x = sample(load_model(tmp_path / name), 2, progress=False)
        assert x.shape == (2, 3, 16, 16) and (tmp_path / name / "vae").is_dir()
    assert run(["distill", "sfddm", "--teacher", models["sd-f"], "--steps", 4, "--iters", 2, "--out",
                tmp_path / "refused", *common]) == 2


def test_refusals_read_as_one_line(models, tmp_path, capsys):
    assert run(["sample", models["sd-f"], "--n", 2]) == 2
    assert "text-conditioned: give --prompt" in capsys.readouterr().err
    assert run(["sample", "digits-teacher", "--n", 2, "--prompt", "a cat"]) == 2
    assert "not text-conditioned" in capsys.readouterr().err
    sd = load_model(models["sd-f"])  # from Python the same refusal names the keyword, sampling or not
    with pytest.raises(FewstepError, match=r"text-conditioned: give prompts \(a string or a list of them\)$"):
        sample(sd, 2, progress=False)
    with pytest.raises(FewstepError, match=r"text-conditioned: give prompts \(a string or a list of them\)$"):
        sd.denoiser(torch.zeros((1, *sd.card["data"]["latent_shape"])), 1.0)
    inpaint = tiny_sd(tmp_path / "inpaint", in_channels=9)
    assert run(["import", inpaint, "--out", tmp_path / "inpaint-f"]) == 2
    assert "inpainting UNet's masked-image input" in capsys.readouterr().err
    assert run(["info", models["sd-f"]]) == 0
    out = capsys.readouterr().out
    assert "latents    AutoencoderKL in vae/" in out and "guidance 7.5 by default" in out


FRESH = r'''
import json, sys
sys.modules["fewstep"] = None
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
job = json.loads(sys.argv[1])
pipe = DiffusionPipeline.from_pretrained(job["folder"], custom_pipeline=job["folder"] + "/pipeline.py",
                                         trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
ref = load_file(job["expected"])
kw = {"prompt": job["prompts"]} if job["prompts"] else {}
x = pipe(batch_size=len(ref["x"]), seed=job["seed"], output_type="raw", **kw).images
pil = pipe(batch_size=1, seed=0, **kw).images
assert pil[0].size == (16, 16)
print(json.dumps([float((x - ref["x"]).abs().max()), float(ref["x"].abs().max())]))
'''


@pytest.mark.parametrize("name", ["sd-sfdv", "ldm-sfddm"])
def test_latent_students_export_round_trip(models, tmp_path, name):
    """A distilled latent student, exported: a process without fewstep loads it with diffusers, takes the
    prompt, decodes with the autoencoder, and returns what `fewstep sample` returns for the same seed."""
    from safetensors.torch import save_file
    train = ["--batch", 4, "--no-progress", "--ckpt-every", 0, "--iters", 2]
    if name == "sd-sfdv":
        prompts_file = tmp_path / "prompts.txt"
        prompts_file.write_text("\n".join(PROMPTS) + "\n")
        assert run(["distill", "sfd", "--teacher", models["sd-f"], "--nfe", "1,2", "--m", 1, "--prompts", prompts_file,
                    "--guidance", 4.0, "--out", tmp_path / name, *train]) == 0
        prompts, nfe = PROMPTS[:2], 2
    else:
        images = tmp_path / "images"
        images.mkdir()
        from PIL import Image
        for i in range(8):
            Image.new("RGB", (16, 16), (30 * i, 10, 200 - 20 * i)).save(images / f"{i}.png")
        assert run(["distill", "sfddm", "--teacher", models["ldm-f"], "--data", images, "--steps", 4,
                    "--out", tmp_path / name, *train]) == 0
        prompts, nfe = None, None
    assert run(["export", tmp_path / name, "--format", "diffusers", "--out", tmp_path / "export",
                *(["--nfe", nfe] if nfe else [])]) == 0
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["vae"][0] == "diffusers" and (tmp_path / "export" / "vae").is_dir()
    # the folder's README shows a call that runs: a text model's takes a prompt
    assert ('pipe(prompt="a red bicycle", batch_size=16' in (tmp_path / "export" / "README.md").read_text()) \
        == (name == "sd-sfdv")
    assert ("text_encoder" in index) == (name == "sd-sfdv")
    x = sample(load_model(tmp_path / name), 3, seed=4, nfe=nfe, prompts=prompts, progress=False)
    save_file({"x": x.contiguous()}, str(tmp_path / "expected.safetensors"))
    job = {"folder": str(tmp_path / "export"), "expected": str(tmp_path / "expected.safetensors"), "seed": 4,
           "prompts": prompts}
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([sys.executable, "-c", FRESH, json.dumps(job)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    diff, scale = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{name}: export round trip max |diff| = {diff:.3g} (scale {scale:.3g})")
    assert diff <= 1e-5


def test_missing_transformers_is_one_line(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    den = load_model(models["sd-f"]).denoiser
    with pytest.raises(FewstepError, match=r"pip install 'fewstep\[text\]'"):
        den.encode_prompts(["a cat"])


def test_sampling_keeps_no_conditioning_between_calls(models, tmp_path):
    """Prompts, negative prompt and guidance belong to one call: a call with other settings leaves the next
    call's defaults (the card's) as they were, and a card's negative prompt and guidance are its defaults."""
    model = load_model(models["sd-f"])
    kw = dict(n=2, seed=1, nfe=4, progress=False)
    default = sample(model, prompts=["a cat"], **kw)
    sample(model, prompts=["a dog"], negative_prompt="a cat", guidance=2.0, **kw)
    assert torch.equal(sample(model, prompts=["a cat"], **kw), default)
    assert torch.equal(sample(load_model(models["sd-f"]), prompts=["a cat"], **kw), default)
    # a card that names a negative prompt and a scale samples with them when the call gives none
    folder = tmp_path / "card-defaults"
    shutil.copytree(models["sd-f"], folder)
    card = json.loads((folder / "fewstep.json").read_text())
    card["text"] = {**card.get("text", {}), "negative_prompt": "blurry", "guidance": 3.0}
    (folder / "fewstep.json").write_text(json.dumps(card))
    assert torch.equal(sample(load_model(folder), prompts=["a cat"], **kw),
                       sample(model, prompts=["a cat"], negative_prompt="blurry", guidance=3.0, **kw))


def test_a_long_prompt_is_cut_with_a_note(models, capsys):
    """A prompt longer than the tokenizer's limit is cut as diffusers cuts it, and the cut part is named once."""
    model = load_model(models["sd-f"])
    long = "a cat on a mat near two green apples"
    sample(model, 1, nfe=2, prompts=[long], progress=False)
    err = capsys.readouterr().err
    assert "cut off" in err and "apples" in err and "Traceback" not in err
    sample(model, 1, nfe=2, prompts=[long], progress=False)
    assert "cut off" not in capsys.readouterr().err


def tiny_sdxl(folder, seed=4):
    """A StableDiffusionXLPipeline as SDXL base is laid out (CLIP-L, CLIP-G with projection, text_time added
    conditioning), at toy size, with a DPM-Solver++ scheduler fewstep reproduces step for step."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    te1 = CLIPTextModel(tiny_clip_config(tok)).eval()
    te2 = CLIPTextModelWithProjection(tiny_clip_config(tok, projection_dim=32)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                transformer_layers_per_block=1).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.13025).eval()
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                              unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


def test_sdxl_equals_its_pipeline(models, tmp_path):
    """An imported StableDiffusionXLPipeline (two encoders side by side, the pooled embedding and the size ids
    as added conditioning, zero embeddings for no negative prompt) samples as the pipeline's default call with
    its scheduler, and with a negative prompt and another scale; SFD distils it and the student exports."""
    from diffusers import StableDiffusionXLPipeline

    import fewstep
    folder = tiny_sdxl(tmp_path / "sdxl")
    model = fewstep.import_model(folder, tmp_path / "sdxl-f")
    card = model.card
    assert card["net"]["type"] == "diffusers-unet2d-xl" and card["net"]["time_ids"] == [16, 16, 0, 0, 16, 16]
    assert card["text"]["encoders"] == {"kind": "sdxl", "zeros_for_empty_prompt": True} and card["text"]["guidance"] == 5
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    lat = _latents(6)
    for kw in ({}, {"negative_prompt": "blurry", "guidance_scale": 3.0, "num_inference_steps": 8}):
        with torch.no_grad():
            ref = pipe(PROMPTS, latents=lat.clone(), output_type="pt", height=16, width=16, **kw).images
        x = sample(model, 3, noise=lat, prompts=PROMPTS, nfe=kw.get("num_inference_steps"),
                   negative_prompt=kw.get("negative_prompt"), guidance=kw.get("guidance_scale"), progress=False)
        diff = ((x / 2 + 0.5).clamp(0, 1) - ref).abs().max().item()
        print(f"SDXL {kw or 'default call'}: max |fewstep - pipeline| = {diff:.3g} (images in [0, 1])")
        assert diff <= 5e-6
    student = fewstep.distill_sfd(model, tmp_path / "sfd", nfe=2, m=1, prompts=PROMPTS, iters=2, batch=4,
                                  progress=False)
    assert student.card["text"]["encoders"]["kind"] == "sdxl"
    x = sample(student, 3, seed=4, prompts=PROMPTS[:2], progress=False)
    from fewstep.interop.diffusers_pipeline import load_pipeline
    exported = load_pipeline(fewstep.export_model(student, tmp_path / "export"))
    exported.set_progress_bar_config(disable=True)
    diff = (exported(batch_size=3, seed=4, prompt=PROMPTS[:2], output_type="raw").images - x).abs().max().item()
    print(f"SDXL student: export round trip max |diff| = {diff:.3g}")
    assert diff <= 1e-5
