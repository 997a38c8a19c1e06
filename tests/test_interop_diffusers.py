"""diffusers interop: tiny UNet2DModel folders in (import, solver equality with diffusers' own
schedulers, every distillation method on the imported teacher), students out (exported folders
loaded in a fresh process without fewstep reproduce `fewstep sample`), and refused inputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,  # noqa: E402
                       DPMSolverMultistepScheduler, UNet2DModel)

from fewstep.checkpoint import LOCK_NAME, RunLock, save_checkpoint  # noqa: E402
from fewstep.models import load_model  # noqa: E402
from fewstep.cli import main  # noqa: E402
from test_cli import run  # noqa: E402  (cli.main in-process, returning the exit status)
from fewstep.errors import FewstepError  # noqa: E402
from fewstep.interop import foreign_kind, import_model  # noqa: E402
from fewstep.interop.diffusers_export import export_diffusers  # noqa: E402
from fewstep.interop.diffusers_io import DiffusersUNet  # noqa: E402
from fewstep.sampling import resolve_sampler, sample  # noqa: E402
from fewstep.solvers import solve  # noqa: E402

EXPORT_TOL = 1e-5


def tiny_unet(seed=0, num_class_embeds=None, **kw):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       num_class_embeds=num_class_embeds, **kw).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three layouts × three schedules: a DDPM pipeline folder (linear, ε), a bare unet/ + scheduler/
    pair (DDIM config, linear, v), and a bare class-conditional UNet2DModel folder with its scheduler
    config beside it (squaredcos_cap_v2, ε)."""
    root = tmp_path_factory.mktemp("diffusers")
    DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "eps")
    tiny_unet(1).save_pretrained(root / "v" / "unet")
    DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(root / "v" / "scheduler")
    tiny_unet(2, num_class_embeds=3).save_pretrained(root / "cos")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_config(root / "cos")
    return root


@pytest.fixture(scope="module")
def imported(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    return {k: import_model(folders / k, out / k) for k in ("eps", "v", "cos")}


def test_import_cards_and_outputs(folders, imported):
    for name, param, table, layout in [("eps", "eps", "linear", "pipeline"), ("v", "v", "linear", "unet+scheduler"),
                                       ("cos", "eps", "squaredcos_cap_v2", "unet")]:
        assert foreign_kind(folders / name) == "diffusers"
        ck = load_model(imported[name])
        card = ck.card
        assert card["source"]["format"] == "diffusers" and card["source"]["layout"] == layout
        assert len(card["source"]["sha256"]) == 64 and card["source"]["unet_config"]["sample_size"] == 8
        assert card["denoiser"]["param"] == param and card["denoiser"]["schedule"]["table_name"] == f"diffusers:{table}"
        assert card["data"]["shape"] == [1, 8, 8] and card["data"]["num_classes"] == (3 if name == "cos" else 0)
        # the default sampler is the folder's scheduler, as its diffusers pipeline runs it
        expected = {"eps": ("ddpm", 1000), "v": ("ddim", 50), "cos": ("ddim", 50)}[name]
        assert (card["sampler"]["name"], card["sampler"]["nfe"]) == expected
        assert card["sampler"]["grid"] == "leading" and card["sampler"]["scale"] == "vp"
        assert card["sampler"]["clip"] == 1.0  # clip_sample, on by default in both schedulers
        # the table is diffusers' own (float32 cumprod), and the network is the UNet, weight for weight
        ref = DDIMScheduler.from_config(DDIMScheduler.load_config(folders / name / ("" if name == "cos" else "scheduler")))
        assert torch.equal(ck.denoiser.schedule.alpha_bar, ref.alphas_cumprod.double())
        unet = UNet2DModel.from_pretrained(folders / name / ("" if name == "cos" else "unet")).eval()
        x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([0.0, 17.0, 999.0])
        labels = torch.tensor([0, 1, 2]) if name == "cos" else None
        with torch.no_grad():
            assert torch.equal(ck.denoiser.net(x, t, class_labels=labels), unet(x, t, class_labels=labels).sample)
        assert set(ck.denoiser.net.state_dict()) == {f"unet.{k}" for k in unet.state_dict()}


def _diffusers_loop(scheduler, unet, y, labels, **step_kw):
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(y, t, class_labels=labels).sample
            y = scheduler.step(out, t, y, **step_kw).prev_sample
    return y


@pytest.mark.parametrize("name", ["eps", "v", "cos"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m"])
def test_solvers_equal_diffusers_schedulers(folders, imported, name, solver):
    """fewstep's DDIM / DPM-Solver++(2M) on the imported teacher equal diffusers' own loops on the
    same UNet and noise; fewstep's σ grid is the table's σ at the diffusers scheduler's timesteps."""
    sub = "" if name == "cos" else "scheduler"
    cfg = DDIMScheduler.load_config(folders / name / sub)
    if solver == "ddim":
        ref = DDIMScheduler.from_config(cfg, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
        ref.set_timesteps(10)
        kw = {"eta": 0.0}
    else:
        ref = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                      solver_type="midpoint", lower_order_final=True,
                                                      final_sigmas_type="zero", timestep_spacing="linspace")
        ref.set_timesteps(8)
        kw = {}
    unet = UNet2DModel.from_pretrained(folders / name / ("" if name == "cos" else "unet")).eval()
    den = load_model(imported[name]).denoiser
    labels = torch.tensor([0, 1, 2, 0]) if name == "cos" else None
    y0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = _diffusers_loop(ref, unet, y0.clone(), labels, **kw)
    ts = ref.timesteps.long()
    grid = torch.cat([den.schedule.sigmas[ts], torch.zeros(1, dtype=torch.float64)])
    x = y0 / den.schedule.alpha_bar[ts[0]].sqrt().float()
    with torch.no_grad():
        ours = solve(solver, den.with_step(None, labels), x, grid).x
    diff, scale = (ours - y).abs().max().item(), y.abs().max().item()
    print(f"{solver} on {name}: max |fewstep - diffusers| = {diff:.3g} (output scale {scale:.3g})")
    # a random ε-UNet's samples reach hundreds (its ε is no noise estimate); float32 agreement is relative
    assert diff <= 2e-6 * max(1.0, scale)


def test_another_sampler_clips_as_its_diffusers_scheduler_would(folders, imported):
    """A DDPM folder with clip_sample on, sampled with DPM-Solver++(2M): DPMSolverMultistepScheduler made from
    its config does not clip, and neither does fewstep (float32 agreement); DDIM from the same config clips;
    `clip` overrides either way."""
    cfg = DDPMScheduler.load_config(folders / "eps" / "scheduler")
    assert cfg.get("clip_sample", True)
    ref = DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(8)
    unet = UNet2DModel.from_pretrained(folders / "eps" / "unet").eval()
    y0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = _diffusers_loop(ref, unet, y0.clone(), None)
    model = load_model(imported["eps"])
    x, info = sample(model, 3, noise=y0, nfe=8, sampler="dpmpp2m", progress=False, return_info=True)
    assert info["clip"] is None
    assert (x - y).abs().max().item() <= 2e-6 * max(1.0, y.abs().max().item())
    clipped = sample(model, 3, noise=y0, nfe=8, sampler="dpmpp2m", clip=1.0, progress=False)
    assert not torch.equal(clipped, x)
    assert sample(model, 3, noise=y0, nfe=8, sampler="ddim", progress=False, return_info=True)[1]["clip"] == 1.0
    assert sample(model, 3, noise=y0, nfe=8, sampler="ddim", clip=None, progress=False, return_info=True)[1]["clip"] \
        is None


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_on_a_scheduler_spacing_equals_euler_discrete(folders, imported, spacing):
    """Euler on an imported model's timestep spacing is EulerDiscreteScheduler from its config, its first state
    included (σ_max·noise on trailing, sqrt(1 + σ_max²)·noise on leading). (On linspace EulerDiscreteScheduler
    steps on unrounded timesteps, which fewstep does not replay: a card's linspace is not carried into Euler.)"""
    from diffusers import EulerDiscreteScheduler
    ref = EulerDiscreteScheduler.from_config(DDIMScheduler.load_config(folders / "v" / "scheduler"),
                                             timestep_spacing=spacing)
    ref.set_timesteps(6)
    unet = UNet2DModel.from_pretrained(folders / "v" / "unet").eval()
    y0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = y0 * ref.init_noise_sigma
    with torch.no_grad():
        for t in ref.timesteps:
            y = ref.step(unet(ref.scale_model_input(y, t), t).sample, t, y).prev_sample
    x = sample(load_model(imported["v"]), 3, noise=y0, nfe=6, sampler="euler", grid=spacing, progress=False)
    assert (x - y).abs().max().item() <= 2e-6 * max(1.0, y.abs().max().item())


def test_sfd_v_student_starts_as_its_teacher(imported):
    """The zero kind of step condition reaches the UNet's time embedding and starts as an exact no-op; the
    authors' kind modulates every resnet block's time projection."""
    from fewstep.sfd.config import SFDConfig
    from fewstep.sfd.method import SFD

    teacher = load_model(imported["v"])
    authors = SFD(teacher, SFDConfig(nfe=[1, 3], m=1)).student
    assert len(authors.net.step_cond.blocks) == len(authors.net._step_block_layers()) > 0
    method = SFD(teacher, SFDConfig(nfe=[1, 3], m=1, step_condition="zero"))
    student = method.student
    assert student.has_step_condition and student.net.config["step_condition"]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 5
    sigma = torch.tensor([80.0, 5.0, 0.5, 0.05], dtype=torch.float64)
    with torch.no_grad():
        ref = teacher.denoiser(x, sigma)
        for n in (3, 5):
            assert torch.equal(student(x, sigma, step=n), ref)
        # the condition is live: a non-zero output layer changes the result, and differently per N
        torch.nn.init.normal_(student.net.step_cond.fc2.weight, std=0.5)
        a, b = student(x, sigma, step=3), student(x, sigma, step=5)
    assert (a - ref).abs().max() > 1e-4 and (a - b).abs().max() > 1e-6
    with pytest.raises(FewstepError, match="step condition"):
        student(x, sigma)


def test_features_default_and_named(imported):
    den = load_model(imported["eps"]).denoiser
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor(2.0, dtype=torch.float64)
    with torch.no_grad():
        out, feats = den.raw(x, sigma, return_features=True)
        assert feats.shape == (2, 16, 8, 8) and torch.equal(out, den.raw(x, sigma))  # the last up block
        net = DiffusersUNet(unet=den.net.config["unet"], feature_layer="mid_block")
        assert net.config["feature_layer"] == "unet.mid_block"
        net.load_state_dict(den.net.state_dict())
        _, mid = net(x * 0.4, torch.tensor([3.0, 3.0]), return_features=True)
    assert mid.shape == (2, 32, 4, 4)
    with pytest.raises(FewstepError, match="feature layer 'nope'"):
        DiffusersUNet(unet=den.net.config["unet"], feature_layer="nope")


# ---- students of the imported teacher, and of fewstep's own and EDM teachers, exported ----------

TRAIN = ["--batch", 4, "--ckpt-every", 0, "--no-progress", "--log-every", 1]


def _edm_students(root):
    """Hand-made SFD-style students of the three EDM preconditionings (continuous schedules)."""
    from fewstep.denoiser import Denoiser
    from fewstep.schedule import nested_grids
    from fewstep.interop.edm_nets import SongUNet
    from fewstep.schedule import Schedule

    out = {}
    for param, sched in [("edm", Schedule.continuous(0.002, 80.0, 0.5)),
                         ("eps", Schedule.continuous(0.002, 80.0, 0.5, "vp", {"beta_d": 19.9, "beta_min": 0.1,
                                                                              "M": 1000})),
                         ("ve", Schedule.continuous(0.02, 80.0, 0.5, "ve"))]:
        torch.manual_seed(3)
        net = SongUNet(resolution=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(4,), dropout=0.0)
        with torch.no_grad():  # EDM zero-initialises its output layers, which would hide the time input
            for p in net.parameters():
                p.add_(0.2 * torch.randn(p.shape) / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.05 * torch.randn(p.shape))
        spec = {"name": "euler", "afs": True, "final_zero": False, "clip": None}
        if param == "edm":  # an SFD-v model: the step count goes to the network
            net.add_step_condition()
            torch.nn.init.normal_(net.step_cond.fc2.weight, std=0.1)
            grids = {str(n): [float(s) for s in nested_grids("polynomial", n + 2, 0, sched.sigma_min, 80.0)[0]]
                     for n in (2, 3)}
            spec.update(nfe=3, grids=grids)
        else:
            spec.update(nfe=2, sigmas=[float(s) for s in nested_grids("polynomial", 4, 0, sched.sigma_min, 80.0)[0]])
        card = {"method": {"name": "sfd-v" if param == "edm" else "sfd"}, "sampler": spec, "teacher": None,
                "data": {"kind": "image", "shape": [1, 8, 8], "name": "test"}}
        out[f"edm-{param}"] = save_checkpoint(root / f"edm-{param}", Denoiser(net, sched, param), card)
    return out


def _edm_snapshots(root):
    """NVlabs/edm snapshots (VP, VE, EDM preconditioning; both architectures) written by the EDM import's
    own test helpers, when present: their students come through the on-the-fly import of the .pkl."""
    try:
        import importlib
        helpers = importlib.import_module("test_interop_edm")
        build_edm, write_snapshot = helpers.build_edm, helpers.write_snapshot
    except (ImportError, AttributeError):
        return {}
    return {f"edm-pkl-{p}-{m}": write_snapshot(root / f"{p}-{m}.pkl", build_edm(p, m, seed=5)[0])
            for p, m in [("EDMPrecond", "SongUNet"), ("VPPrecond", "SongUNet"), ("VEPrecond", "SongUNet"),
                         ("EDMPrecond", "DhariwalUNet")]}


EDM_PKL = ["edm-pkl-EDMPrecond-SongUNet", "edm-pkl-VPPrecond-SongUNet", "edm-pkl-VEPrecond-SongUNet",
           "edm-pkl-EDMPrecond-DhariwalUNet"]


@pytest.fixture(scope="module")
def students(folders, imported, tmp_path_factory):
    """Every method's student, exported, and one fresh process (fewstep made unimportable) that loads
    each export and samples the same seeds: {name: (checkpoint, export, nfe, max |diff|)}."""
    root = tmp_path_factory.mktemp("students")
    os.environ["FEWSTEP_CACHE"] = str(root / "cache")  # on-the-fly imports of --teacher FOLDER land here
    v = folders / "v"
    assert run(["distill", "sfd", "--teacher", v, "--nfe", 2, "--m", 1, "--iters", 2, "--out", root / "sfd", *TRAIN]) == 0
    assert run(["distill", "sfd", "--teacher", v, "--nfe", "1,3", "--m", 1, "--iters", 2, "--out", root / "sfdv",
                *TRAIN]) == 0
    assert run(["distill", "sfd", "--teacher", root / "sfdv", "--stage2", "--iters", 1, "--out", root / "stage2",
                *TRAIN]) == 0
    assert run(["distill", "sfddm", "--teacher", imported["v"], "--data", "digits", "--steps", 4, "--iters", 2,
                "--out", root / "sfddm", *TRAIN]) == 0
    assert run(["distill", "progressive", "--teacher", imported["v"], "--data", "digits", "--start-steps", 8,
                "--steps", 4, "--iters", 2, "--out", root / "progressive", *TRAIN]) == 0
    assert run(["distill", "sfd", "--teacher", "digits-teacher", "--nfe", 2, "--m", 1, "--iters", 1,
                "--out", root / "digits-sfd", *TRAIN]) == 0
    assert run(["distill", "sfd", "--teacher", "gmm8-teacher", "--nfe", "1,2", "--m", 1, "--iters", 1,
                "--out", root / "gmm8-sfdv", *TRAIN]) == 0
    for name, pkl in _edm_snapshots(root).items():
        assert run(["distill", "sfd", "--teacher", pkl, "--nfe", 2, "--m", 1, "--iters", 1, "--out", root / name,
                    *TRAIN]) == 0
    ckpts = {k: root / k for k in ("sfd", "sfdv", "stage2", "sfddm", "progressive", "digits-sfd", "gmm8-sfdv",
                                   *EDM_PKL) if (root / k).is_dir()}
    ckpts.update(_edm_students(root))
    ckpts.update({"teacher-cos": imported["cos"], "teacher-digits": "digits-teacher"})  # DDIM, DPM-Solver++(2M)
    jobs, nfes = [], {"sfdv": 1, "gmm8-sfdv": 2, "edm-edm": 2, "teacher-cos": 10, "teacher-digits": 12}
    from safetensors.torch import save_file
    for i, (name, ck) in enumerate(ckpts.items()):
        nfe = nfes.get(name)
        assert run(["export", ck, "--format", "diffusers", "--out", root / "export" / name,
                    *(["--nfe", nfe] if nfe else [])]) == 0
        seed = 10 + i
        loaded = load_model(ck)
        x = sample(loaded, 5, seed=seed, nfe=nfe, progress=False)
        # and from given noise (the seed then only drives DDPM's per-step noise and the class labels)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 100))
        xz = sample(loaded, 5, seed=seed, nfe=nfe, noise=z, progress=False)
        save_file({"x": x.contiguous(), "z": z, "xz": xz.contiguous()}, str(root / f"{name}.expected.safetensors"))
        jobs.append({"name": name, "folder": str(root / "export" / name), "seed": seed,
                     "expected": str(root / f"{name}.expected.safetensors"),
                     "loader": "diffusers" if i % 2 == 0 else "plain"})
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules"), "HF_HUB_OFFLINE": "1",
           # the same thread count as this process, so both sides round alike (the exports are bit-exact)
           "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(jobs)], capture_output=True, text=True,
                       env=env, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: (load_model(ckpts[k]).path, root / "export" / k, nfes.get(k), diffs[k]) for k in ckpts}


FRESH_PROCESS = r'''
import importlib.util, json, sys
sys.modules["fewstep"] = None  # the export must not need fewstep: any import of it fails here
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

out = {}
for job in json.loads(sys.argv[1]):
    folder = job["folder"]
    if job["loader"] == "diffusers":
        pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder + "/pipeline.py",
                                                 trust_remote_code=True)
    else:
        spec = importlib.util.spec_from_file_location("pipeline_" + job["name"].replace("-", "_"),
                                                      folder + "/pipeline.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        pipe = mod.load_pipeline(folder)
    assert type(pipe).__name__ == "FewstepPipeline", type(pipe)
    pipe.set_progress_bar_config(disable=True)
    ref = load_file(job["expected"])
    expected = ref["x"]
    x = pipe(batch_size=len(expected), seed=job["seed"], output_type="raw").images
    xz = pipe(noise=ref["z"], seed=job["seed"], output_type="raw").images
    assert x.shape == expected.shape, (x.shape, expected.shape)
    diff = max(float((x - expected).abs().max()), float((xz - ref["xz"]).abs().max()))
    out[job["name"]] = [diff, float(expected.abs().max())]
    if pipe.spec["image"]:
        pil = pipe(batch_size=2, seed=0).images
        assert len(pil) == 2 and pil[0].size == (8, 8)
    if job["loader"] == "diffusers":  # loaded in bfloat16: the network follows its weights' dtype
        half = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder + "/pipeline.py",
                                                 trust_remote_code=True, torch_dtype=torch.bfloat16)
        half.set_progress_bar_config(disable=True)
        assert half.unet.dtype == torch.bfloat16
        xh = half(noise=ref["z"], seed=job["seed"], output_type="raw").images
        assert xh.dtype == torch.float32 and torch.isfinite(xh).all() and xh.shape == ref["xz"].shape
assert not [m for m in sys.modules if m.split(".")[0] == "fewstep" and sys.modules[m] is not None]
print(json.dumps(out))
'''


@pytest.mark.parametrize("name", ["sfd", "sfdv", "stage2", "sfddm", "progressive", "digits-sfd", "gmm8-sfdv",
                                  "edm-edm", "edm-eps", "edm-ve", "teacher-cos", "teacher-digits", *EDM_PKL])
def test_export_round_trip_in_a_fresh_process(students, name):
    if name not in students:
        pytest.skip("the EDM import's test helpers are not available")
    ckpt, export, nfe, (diff, scale) = students[name]
    card = load_model(ckpt).card
    index = json.loads((export / "model_index.json").read_text())
    s = index["sampler"]
    plan = resolve_sampler(load_model(ckpt), nfe)
    print(f"{name}: {s['solver']} NFE {s['nfe']}, export round trip max |diff| = {diff:.3g} (scale {scale:.3g})")
    assert diff <= EXPORT_TOL
    assert s["sigmas"] == [float(v) for v in plan["sigmas"]] and s["solver"] == plan["name"]
    assert s["afs"] == plan["afs"] and s["clip"] == plan["clip"] and s["nfe"] == plan["nfe"]
    assert (export / "pipeline.py").is_file() and (export / "README.md").is_file()
    if card["net"]["type"] == "diffusers-unet2d":
        # a plain UNet2DModel: any diffusers code loads it
        assert index["unet"] == ["diffusers", "UNet2DModel"]
        UNet2DModel.from_pretrained(export / "unet")
    else:
        assert index["unet"] == ["fewstep_net", "FewstepNet"] and (export / "unet" / "fewstep_net.py").is_file()
    expected_solver = {"sfd": "euler", "sfdv": "euler", "stage2": "euler", "sfddm": "ddpm", "progressive": "ddim",
                       "teacher-cos": "ddim", "teacher-digits": "dpmpp2m"}
    if name in expected_solver:
        assert s["solver"] == expected_solver[name] and s["time_input"]["kind"] == "discrete"
    if name in ("sfdv", "stage2"):  # the authors' kind (the default), folded for the exported N: a plain UNet2DModel
        assert s["step_condition"]["kind"] == "authors" and "per-block time projections" in s["step_condition"]["folded_into"]
    if name in ("gmm8-sfdv", "edm-edm"):
        # fewstep's own networks too: the condition for the exported N is folded, the network takes no step
        assert s["step_condition"]["step"] == len(s["sigmas"]) and "bias" in s["step_condition"]["folded_into"]
        assert json.loads((export / "unet" / "config.json").read_text())["net_config"]["step_condition"] is False
    if name == "teacher-cos":  # class-conditional: labels drawn from seed + 2 on both sides
        assert s["num_classes"] == 3
    if name in EDM_PKL:
        assert s["param"] == {"EDMPrecond": "edm", "VPPrecond": "eps", "VEPrecond": "ve"}[name.split("-")[2]]
    if name.startswith("edm-") and name not in EDM_PKL:
        assert s["time_input"]["time_code"] == {"edm-edm": "edm", "edm-eps": "vp", "edm-ve": "ve"}[name]


def test_imported_teacher_card_names_on_the_fly_source(students, folders):
    """`--teacher FOLDER` imported the diffusers folder on the fly; the student's card names it."""
    card = load_model(students["sfd"][0]).card
    teacher = load_model(card["teacher"]["path"]).card
    assert teacher["source"]["path"] == str((folders / "v").resolve())


# ---- refused inputs ----------------------------------------------------------------------------

def _bare(root, unet_cfg=None, sched=None, weights=True):
    root.mkdir(parents=True)
    cfg = dict(tiny_unet().config) if unet_cfg is None else unet_cfg
    (root / "config.json").write_text(json.dumps({**{k: v for k, v in cfg.items() if not k.startswith("_")},
                                                  "_class_name": cfg.get("_class_name", "UNet2DModel")}))
    if weights:
        (root / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    if sched is not None:
        (root / "scheduler_config.json").write_text(json.dumps(sched))
    return root


DDPM_CFG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}


@pytest.mark.parametrize("case,match", [
    ("conditional", "found UNet2DConditionModel where a UNet2DModel belongs"),
    ("beta", "beta_schedule 'sigmoid' is not supported; expected one of linear, scaled_linear, squaredcos_cap_v2"),
    ("prediction", "prediction_type 'flow': expected one of epsilon, v_prediction, sample"),
    ("no-unet", "DDPMPipeline lists no unet \\(components: scheduler\\)"),
    ("sdxl", "text_encoder_2 \\(a second text encoder outside SDXL\\)"),
    ("controlnet", "controlnet \\(a ControlNet\\), which fewstep does not run"),
    ("lora", "LoRA weights alone \\(pytorch_lora_weights.safetensors\\)"),
    ("no-scheduler", "no scheduler config \\(looked for"),
    ("bin", "no diffusion_pytorch_model.safetensors nor .*index.json \\(found: diffusion_pytorch_model.bin\\)"),
    ("scheduler-class", "scheduler 'ScoreSdeVeScheduler' is not a discrete VP scheduler"),
    ("zero-snr", "rescale_betas_zero_snr"),
    ("fourier", "time_embedding_type 'fourier' is not supported"),
])
def test_unsupported_folders_are_refused(tmp_path, case, match):
    src = tmp_path / case
    base = dict(tiny_unet().config)
    if case == "conditional":
        _bare(src, {"_class_name": "UNet2DConditionModel", "sample_size": 8, "cross_attention_dim": 32}, DDPM_CFG)
    elif case == "beta":
        _bare(src, sched={**DDPM_CFG, "beta_schedule": "sigmoid"})
    elif case == "prediction":
        _bare(src, sched={**DDPM_CFG, "prediction_type": "flow"})
    elif case == "no-unet":
        src.mkdir()
        (src / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                          "scheduler": ["diffusers", "DDPMScheduler"]}))
    elif case in ("sdxl", "controlnet"):
        src.mkdir()
        extra = {"sdxl": {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
                 "controlnet": {"controlnet": ["diffusers", "ControlNetModel"]}}[case]
        (src / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"],
                                                          "vae": ["diffusers", "AutoencoderKL"], **extra,
                                                          "scheduler": ["diffusers", "DDIMScheduler"]}))
    elif case == "lora":
        src.mkdir()
        (src / "pytorch_lora_weights.safetensors").write_bytes(b"not read")
    elif case == "no-scheduler":
        _bare(src)
    elif case == "bin":
        _bare(src, sched=DDPM_CFG, weights=False)
        (src / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    elif case == "scheduler-class":
        _bare(src, sched={"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000})
    elif case == "zero-snr":
        _bare(src, sched={**DDPM_CFG, "rescale_betas_zero_snr": True})
    elif case == "fourier":
        _bare(src, {**base, "time_embedding_type": "fourier"}, DDPM_CFG)
    assert foreign_kind(src) == "diffusers"
    with pytest.raises(FewstepError, match=match):
        import_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import_refusal_is_one_line(tmp_path, capsys):
    src = _bare(tmp_path / "bad", sched={**DDPM_CFG, "beta_schedule": "exp"})
    assert run(["import", src, "--out", tmp_path / "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "beta_schedule 'exp'" in err[0] and "Traceback" not in err[0]


def test_import_never_overwrites_a_model(folders, imported, tmp_path, capsys):
    """`fewstep import` into a folder that holds a fewstep model is refused and leaves it byte for byte."""
    out = tmp_path / "taken"
    shutil.copytree(imported["v"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert run(["import", folders / "eps", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a fewstep model" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_missing_diffusers_is_a_clear_error(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(FewstepError, match=r"pip install 'fewstep\[diffusers\]'"):
        import_model(folders / "eps", tmp_path / "out")


def test_export_refuses_an_unsupported_sampler_and_a_used_folder(imported, tmp_path):
    ck = load_model(imported["eps"])
    card = {k: ck.card[k] for k in ("method", "teacher", "data")}
    save_checkpoint(tmp_path / "heun", ck.denoiser, {**card, "sampler": {"name": "heun", "nfe": 9}})
    with pytest.raises(FewstepError, match="sampler is 'heun'; the exported pipeline implements"):
        export_diffusers(tmp_path / "heun", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(FewstepError, match="exists and is not empty"):
        export_diffusers(imported["eps"], tmp_path / "used")
    with pytest.raises(FewstepError, match="a file of that name exists"):
        export_diffusers(imported["eps"], tmp_path / "used" / "x")


def test_two_exports_into_one_folder(imported, tmp_path, monkeypatch, capsys):
    """Two exports to one --out: the second is refused in one line, whether it sees the first's folder at its
    check or the first fills the folder while it runs (forced here), and the first's folder stays whole."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "fewstep", "export", "gmm8-teacher", "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    assert all("Traceback" not in err for _, err in results)
    assert json.loads((out / "model_index.json").read_text())["sampler"]["format"] == "fewstep-diffusers-export"
    # the export read back (its model_index names a custom pipeline as [module, class]): one line, no traceback
    for argv in (["import", out, "--out", tmp_path / "back"],
                 ["distill", "sfd", "--teacher", out, "--iters", 1, "--out", tmp_path / "student"]):
        capsys.readouterr()
        assert run(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a pipeline folder `fewstep export` wrote (a teacher model exported from " \
            f"{load_model('gmm8-teacher').path})" in err[0], err
    assert not (tmp_path / "back").exists() and not (tmp_path / "student").exists()
    # the race itself: another export's folder lands in `out` between the check and the rename
    import fewstep.interop.diffusers_export as dio
    raced, share = tmp_path / "raced", dio._share

    def share_then_someone_else_writes(folder):
        share(folder)
        raced.mkdir(exist_ok=True)
        (raced / "model_index.json").write_text("{}")
    monkeypatch.setattr(dio, "_share", share_then_someone_else_writes)
    assert run(["export", "gmm8-teacher", "--out", raced]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another process wrote into the folder" in err[0]
    assert sorted(p.name for p in raced.iterdir()) == ["model_index.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raced.export-")]


def test_a_killed_exports_leftovers_are_removed_and_a_live_ones_kept(imported, tmp_path):
    killed = tmp_path / ".out.export-killed"  # as a kill -9 leaves it: half a folder, its lock released
    killed.mkdir()
    (killed / LOCK_NAME).write_text("123")
    (killed / "model_index.json").write_text("{")
    live = tmp_path / ".out.export-live"
    live.mkdir()
    held = RunLock(live).acquire()
    ck = load_model(imported["eps"])
    model = tmp_path.parent / f"{tmp_path.name}-model"
    save_checkpoint(model, ck.denoiser, {**{k: ck.card[k] for k in ("method", "teacher", "data")},
                                         "sampler": {"name": "dpmpp2m", "nfe": 4}})
    try:
        export_diffusers(model, tmp_path / "out")
        assert not killed.exists() and live.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.export-live", "out"]
        assert not (tmp_path / "out" / LOCK_NAME).exists()
    finally:
        held.release()


@pytest.mark.parametrize("sched", [{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                                   {"trained_betas": [0.001 + 0.0004 * i for i in range(50)],
                                    "num_train_timesteps": 50}])
def test_scaled_linear_and_trained_betas(tmp_path, sched):
    tiny_unet(4).save_pretrained(tmp_path / "unet")
    DDPMScheduler(**sched).save_pretrained(tmp_path / "scheduler")
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "ck"), "--feature-layer", "mid_block"]) is None
    ck = load_model(tmp_path / "ck")
    betas = (torch.tensor(sched["trained_betas"], dtype=torch.float32) if "trained_betas" in sched else
             torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, 1000, dtype=torch.float32) ** 2)
    assert torch.equal(ck.denoiser.schedule.alpha_bar, torch.cumprod(1 - betas, 0).double())
    assert ck.card["net"]["feature_layer"] == "unet.mid_block"
    assert ck.denoiser.schedule.T == len(betas)


@pytest.mark.parametrize("name", ["sfd", "sfdv", "sfddm", "edm-edm", "edm-eps", "edm-ve", "teacher-cos"])
def test_pipeline_denoiser_follows_the_time_input_rule_off_the_grid(students, name):
    """Off its stored grid the pipeline computes the time input from the recorded rule (table index,
    exact table, or EDM/VP/VE code) and the parameterization; both equal fewstep's Denoiser."""
    import importlib.util

    ckpt, export, nfe, _ = students[name]
    spec = importlib.util.spec_from_file_location(f"exported_pipeline_{name.replace('-', '_')}", export / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipe = module.load_pipeline(export)
    den = load_model(ckpt).denoiser
    s = pipe.spec
    if s["time_input"]["kind"] == "discrete" and s["time_input"]["exact"]:
        sigmas = torch.tensor(s["sigmas"][:-1], dtype=torch.float64)[[2, 0, 1]]  # an exact table: its own steps
    else:
        lo, hi = den.sigma_min, den.sigma_max
        sigmas = torch.exp(torch.empty(3, dtype=torch.float64).uniform_(float(torch.tensor(lo).log()),
                                                                         float(torch.tensor(hi).log())))
    labels = torch.tensor([0, 2, 1]) if den.num_classes else None
    step = plan_step = resolve_sampler(load_model(ckpt), nfe)["step"]
    x = torch.randn(3, *s["sample_shape"], generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        for sigma in sigmas:
            assert torch.equal(pipe.time_input(sigma.reshape(1)), den.time_input(sigma.reshape(1)))
            ref = den.with_step(step if den.has_step_condition else None, labels)(x, sigma)
            ref = ref.clamp(-s["clip"], s["clip"]) if s["clip"] is not None else ref
            got = pipe.denoise(x, sigma, labels)
            assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), (name, float(sigma))
    assert plan_step == (None if not den.has_step_condition else len(s["sigmas"]))


# ---- the schedulers' own defaults: spacing, last step, clip, DDPM's variance, the VP-scaled start ----------

@pytest.fixture(scope="module")
def scheduler_folders(tmp_path_factory):
    """One UNet under four scheduler configs a diffusers user meets: DDIM as Stable Diffusion ships it
    (leading, steps_offset 1, set_alpha_to_one false, no clip), DDIM on linspace (steps to t - T//n land
    between its timesteps), DPM-Solver++ multistep (linspace, its own n + 1 spacing) and DDPM with
    fixed_large variance."""
    root = tmp_path_factory.mktemp("schedulers")
    configs = {
        "ddim-sd": DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                 beta_end=0.012, steps_offset=1, set_alpha_to_one=False, clip_sample=False),
        "ddim-linspace": DDIMScheduler(num_train_timesteps=1000, timestep_spacing="linspace", set_alpha_to_one=False,
                                       clip_sample=True, clip_sample_range=0.8),
        "dpm": DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="v_prediction"),
        "ddpm-large": DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large", steps_offset=1),
    }
    for name, sched in configs.items():
        DDPMPipeline(unet=tiny_unet(4), scheduler=sched).save_pretrained(root / name)
    return root


def _pipeline_images(folder, cls, n, seed, steps):
    """What a diffusers user gets: the pipeline with the folder's own scheduler, images in [0, 1]."""
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                   output_type="np", **({"eta": 0.0} if cls is DDIMPipeline else {})).images
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _float32_error(folder, scheduler_cls, noise, steps):
    """How far diffusers' own float32 loop is from the same loop in float64, on images in [0, 1]: the
    precision a float32 sampler can have on this model."""
    import copy
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    images = []
    for dtype in (torch.float32, torch.float64):
        sched = scheduler_cls.from_pretrained(folder / "scheduler")
        sched.set_timesteps(steps)
        for k, v in list(vars(sched).items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(sched, k, v.to(dtype))
        y = _diffusers_loop(sched, copy.deepcopy(unet).to(dtype), noise.to(dtype), None)
        images.append((y.double() / 2 + 0.5).clamp(0, 1))
    return (images[0] - images[1]).abs().max().item()


@pytest.mark.parametrize("name,pipeline", [("ddim-sd", "ddim"), ("ddim-linspace", "ddim"), ("dpm", "ddpm")])
def test_sample_with_the_card_default_is_the_pipeline(scheduler_folders, tmp_path, name, pipeline):
    """`fewstep sample IMPORTED --nfe 10` with the card's default sampler returns what the folder's own
    pipeline returns for `num_inference_steps=10` and the same seed, to float32 precision: no further from it
    than diffusers' own float32 loop is from its float64 one (twice that, and at least 2e-6)."""
    folder = scheduler_folders / name
    ckpt = load_model(import_model(folder, tmp_path / name))
    x, info = sample(ckpt, 4, seed=7, nfe=10, progress=False, return_info=True)
    ref = _pipeline_images(folder, DDIMPipeline if pipeline == "ddim" else DDPMPipeline, 4, 7, 10)
    ours = (x / 2 + 0.5).clamp(0, 1)
    cls = {"ddim": DDIMScheduler, "ddpm": DPMSolverMultistepScheduler}[pipeline]
    expected = cls.from_pretrained(folder / "scheduler")
    expected.set_timesteps(10)
    assert info["timesteps"] == expected.timesteps.tolist()
    diff = (ours - ref).abs().max().item()
    own = _float32_error(folder, cls, torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(7)), 10)
    print(f"{name}: max |fewstep - {pipeline} pipeline| = {diff:.3g}; diffusers float32 vs float64: {own:.3g} "
          "(images in [0, 1])")
    assert diff <= max(2e-6, 2 * own)


def test_ddpm_fixed_large_equals_the_scheduler_step_for_step(scheduler_folders, tmp_path, monkeypatch):
    """DDPM with the folder's fixed_large variance and steps_offset 1, fed the same per-step noises as
    DDPMScheduler: the same samples (its last step, from timestep 1, is noisy too)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    import fewstep.solvers as solvers
    folder = scheduler_folders / "ddpm-large"
    ckpt = load_model(import_model(folder, tmp_path / "ddpm"))
    plan = resolve_sampler(ckpt, 10)
    assert plan["solver_options"] == {"variance": "fixed_large", "noise_at_last": True}
    noises = [torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(50 + i)) for i in range(10)]
    ref_sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    ref_sched.set_timesteps(10)
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    drawn = iter(noises)
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: next(drawn))
    y0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = _diffusers_loop(ref_sched, unet, y0.clone(), None)
    ours_drawn = iter(noises)
    monkeypatch.setattr(solvers.torch, "randn", lambda *a, **k: next(ours_drawn))
    with torch.no_grad():
        x = sample(ckpt, 3, noise=y0, nfe=10, progress=False)
    assert (x - y).abs().max().item() <= 2e-6 * max(1.0, y.abs().max().item())


def test_info_names_the_grid_and_a_scheduler_grid_on_any_table_model(scheduler_folders, tmp_path, capsys):
    imported = import_model(scheduler_folders / "ddim-sd", tmp_path / "sd")
    assert run(["info", imported]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("sampler"))
    assert "ddim NFE 50, leading timestep spacing (steps_offset 1), last step to the table's first entry" in line
    assert "VP scale" in line and "DDIMScheduler" in line
    # fewstep's own table teachers take the spacings too; the grid is on the table's own entries
    x, info = sample(load_model("digits-teacher"), 2, nfe=5, sampler="ddim", grid="trailing", progress=False,
                     return_info=True)
    assert info["timesteps"] == [1023, 818, 613, 409, 204] and torch.isfinite(x).all()
    with pytest.raises(FewstepError, match="scheduler spacing is for"):
        sample(load_model("digits-teacher"), 2, nfe=4, sampler="heun", grid="leading", progress=False)
    # a sampler that cannot run on the card's spacing, asked for without a grid, takes its own default grid
    model = load_model(imported)
    x, info = sample(model, 2, nfe=19, sampler="heun", progress=False, return_info=True)
    assert info["nfe"] == 19
    assert torch.equal(x, sample(model, 2, nfe=19, sampler="heun", grid="polynomial", progress=False))
    assert run(["sample", imported, "--sampler", "heun", "--nfe", 19, "--n", 2]) == 0
    with pytest.raises(FewstepError, match="continuous"):
        from fewstep.schedule import Schedule, scheduler_grid
        scheduler_grid(Schedule.continuous(0.002, 80.0, 0.5), "leading", 4)


def test_export_refuses_a_scheduler_plan_it_cannot_replay(scheduler_folders, tmp_path):
    imported = import_model(scheduler_folders / "ddim-linspace", tmp_path / "lin")
    with pytest.raises(FewstepError, match="targets"):
        export_diffusers(imported, tmp_path / "out", nfe=10)


def test_the_exported_pipelines_progress_bar_counts_network_evaluations(tmp_path):
    """An NFE-2 SFD student takes three Euler steps, the first analytical: its pipeline's bar shows 2, not 3."""
    assert run(["distill", "sfd", "--teacher", "gmm8-teacher", "--nfe", 2, "--iters", 1, "--batch", 8,
                "--out", tmp_path / "sfd", *TRAIN]) == 0
    assert run(["export", tmp_path / "sfd", "--out", tmp_path / "export"]) == 0
    import importlib.util
    spec = importlib.util.spec_from_file_location("pipeline_bar", tmp_path / "export" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pipe = mod.load_pipeline(str(tmp_path / "export"))
    bars = []
    made = pipe.progress_bar
    pipe.progress_bar = lambda *a, **kw: bars.append(made(*a, **kw)) or bars[-1]
    pipe(batch_size=4, seed=0, output_type="raw")
    assert [(b.total, b.n) for b in bars] == [(2, 2)]
