"""fewstep models → diffusers pipeline folders. `export_diffusers` writes a folder a diffusers user loads
without fewstep: the network (`unet/`: a `UNet2DModel` saved with save_pretrained, or for fewstep's own and EDM
networks their standalone source code plus safetensors weights, as a diffusers custom component), a
`pipeline.py` holding `FewstepPipeline`, and in `model_index.json` the sampler: the exact σ grid, AFS, solver,
parameterization, time input and clip of the student's card, so the pipeline reproduces `fewstep sample` for
the same initial noise.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import fewstep.nets
from fewstep.checkpoint import LOCK_NAME, RunLock, load_checkpoint
from fewstep.components import COMPONENT_BATCH, tokenizer_role
from fewstep.errors import FewstepError, option
from fewstep.interop.diffusers_io import DiffusersUNet, require_diffusers
from fewstep.interop.sources import EXPORT_FORMAT, WEIGHTS
from fewstep.lora import PIPELINE_LORA, export_lora, fuse_lora
from fewstep.nets import fold_step_condition
from fewstep.sampling import resolve_sampler, sample_shape

EXPORT_SOLVERS = ("euler", "ddim", "ddpm", "dpmpp2m", "dpmpp3m")
PIPELINE_SOURCE = Path(__file__).with_name("diffusers_pipeline.py")


# networks an export saves as the diffusers models they are
DIFFUSERS_NETS = ("diffusers-unet2d", "diffusers-unet2d-cond", "diffusers-unet2d-xl", "diffusers-sd3-transformer",
                  "diffusers-flux-transformer")
# the network code an export carries for each of fewstep's network types (module, class name)
CUSTOM_NETS = {"unet": ("nets", "UNet"), "mlp": ("nets", "MLP"),
               "edm-songunet": ("edm_nets", "SongUNet"), "edm-dhariwalunet": ("edm_nets", "DhariwalUNet")}

_WRAPPER = '''

# ---- the diffusers component around the network above (written by fewstep export) ----------------
from diffusers import ModelMixin, ConfigMixin  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402

_NET_CLASSES = {NET_CLASSES}


class FewstepNet(ModelMixin, ConfigMixin):
    """fewstep's network `net(x, t, class_labels=None)` as a diffusers model: `t` is the network's time
    input for σ (see the pipeline's `time_input`); an SFD-v step condition is folded into its biases."""
    @register_to_config
    def __init__(self, net_config: dict):
        super().__init__()
        cfg = dict(net_config)
        kind = cfg.pop("type")
        self.net = globals()[_NET_CLASSES[kind]](**cfg)

    def forward(self, x, t, class_labels=None):
        if self.dtype == torch.float32:
            return self.net(x, t, class_labels=class_labels)
        # loaded in another dtype (torch_dtype=...): the time embedding is computed in float32 and the
        # layers run in the weights' dtype
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.net(x.float(), t, class_labels=class_labels).to(self.dtype)
'''


def _network_source(kind: str) -> str:
    """Standalone source of one of fewstep's network modules (needs only torch and numpy)."""
    module, _ = CUSTOM_NETS[kind]
    if module == "edm_nets":
        return (Path(__file__).with_name("edm_nets.py")).read_text()
    text = Path(fewstep.nets.__file__).read_text()
    line = "from fewstep.errors import FewstepError\n"
    if line not in text:
        raise RuntimeError("fewstep.nets no longer imports FewstepError as the export expects")
    return text.replace(line, "\n\nclass FewstepError(ValueError):\n    pass\n")


def _write_custom_net(net, kind: str, folder: Path) -> list:
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    classes = {k: c for k, (m, c) in CUSTOM_NETS.items() if m == CUSTOM_NETS[kind][0]}
    (folder / "fewstep_net.py").write_text(_network_source(kind) + _WRAPPER.replace("{NET_CLASSES}", repr(classes)))
    cfg = {"_class_name": "FewstepNet", "_diffusers_version": diffusers.__version__,
           "net_config": copy.deepcopy(net.config)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    sd = {f"net.{k}": v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(folder / WEIGHTS))
    return ["fewstep_net", "FewstepNet"]


def _write_diffusers_unet(net: DiffusersUNet, folder: Path) -> list:
    """Save the diffusers network (a step condition already folded into its biases: a plain UNet2DModel,
    UNet2DConditionModel or SD3Transformer2DModel)."""
    module = net.unet if isinstance(net, DiffusersUNet) else net.transformer
    copy.deepcopy(module).float().cpu().eval().save_pretrained(str(folder), safe_serialization=True)
    return ["diffusers", type(module).__name__]


def _write_components(den, folder: Path) -> tuple[dict, dict]:
    """A latent or text model's frozen parts, copied into the export as diffusers lays them out: (the
    model_index entries, what the sampler needs of them)."""
    index, spec = {}, {}
    if den.codec is not None:
        shutil.copytree(den.codec.folder, folder / "vae")
        index["vae"] = ["diffusers", den.codec.entry["class"]]
        spec["latent"] = {"scaling_factor": den.codec.entry["scaling_factor"], "kind": den.codec.entry["kind"],
                          "shift_factor": den.codec.entry.get("shift_factor", 0.0), "batch": COMPONENT_BATCH}
    if den.text is not None:
        for enc in den.text.parts:
            role = enc.entry.get("role", "text_encoder")
            shutil.copytree(enc.folder, folder / role)
            shutil.copytree(enc.tokenizer_folder, folder / tokenizer_role(role))
            index[role] = ["transformers", enc.entry["class"]]
            index[tokenizer_role(role)] = ["transformers", enc.entry.get("tokenizer_class", "CLIPTokenizer")]
        spec["text"] = {"guidance": den.guidance, "negative_prompt": den.negative_prompt, "batch": COMPONENT_BATCH}
        if getattr(den.text, "settings", None):
            spec["text"]["encoders"] = den.text.settings
    return index, spec


def _fold_for_export(net, step: int | None) -> tuple[nn.Module, dict | None]:
    """The network an export writes: an SFD-v step condition for the exported N is a constant added to
    some layers' outputs, so it folds into their biases (fewstep.nets.fold_step_condition) and the
    exported network takes no step."""
    if net.step_cond is None:
        return net, None
    kind = net.step_condition_kind
    if kind == "zero" and getattr(getattr(net, "unet", None), "time_embedding", None) is not None \
            and getattr(net.unet.time_embedding, "post_act", None) is not None:
        raise FewstepError("export: this UNet2DModel's time embedding ends in an activation, so its step "
                           "condition cannot be folded into a bias")
    layers = [net._step_embedding_layer()] if kind == "zero" else net._step_block_layers()
    names = {id(m): n for n, m in net.named_modules()}
    folded = fold_step_condition(copy.deepcopy(net).cpu().float(), step)
    return folded, {"step": int(step), "kind": kind,
                    "folded_into": (f"{names[id(layers[0])]}.bias" if kind == "zero"
                                    else f"the biases of the {len(layers)} per-block time projections")}


def time_input_spec(den) -> dict:
    s = den.schedule
    if s.is_discrete:
        spec = {"kind": "discrete", "alpha_bar": [float(a) for a in s.alpha_bar], "exact": bool(den.exact_table),
                "rule": "fractional table index, linear in log σ between entries (exact: the nearest entry)"}
        if not torch.equal(s.timesteps.double(), torch.arange(len(s.timesteps), dtype=torch.float64)):
            spec["timesteps"] = [float(t) for t in s.timesteps]  # left out when they are the index 0..T-1
        return spec
    spec = {"kind": "continuous", "time_code": s.time_code, "time_params": dict(s.time_params or {})}
    spec["rule"] = {"edm": "log(σ)/4 in float32", "vp": "(M−1)·t(σ) of the VP-SDE in float32",
                    "ve": "log(σ/2) in float32", "flow": "T·t with t = σ/(1 + σ), in float64 rounded to float32"
                    }[s.time_code]
    return spec


def _grid_time_inputs(den, sigmas) -> list:
    """The network's time input at each grid point, as fewstep computes it (None at σ = 0, where no
    network is evaluated)."""
    pos = sigmas[sigmas > 0]
    t = den.time_input(pos.to(torch.float64)).float().tolist()
    return t + [None] * (len(sigmas) - len(pos))


def index_json(index: dict) -> str:
    """model_index.json as people read it: indented, but each list of numbers (the σ grid, a 1,000-entry ᾱ
    table) on one line instead of one number a line."""
    lists = []

    def inline(v):
        if isinstance(v, dict):
            return {k: inline(x) for k, x in v.items()}
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) or x is None for x in v):
            lists.append(json.dumps(v))
            return f"\0{len(lists) - 1}\0"
        return [inline(x) for x in v] if isinstance(v, list) else v
    text = json.dumps(inline(index), indent=2)
    for k, dumped in enumerate(lists):
        text = text.replace(f'"\\u0000{k}\\u0000"', dumped)
    return text + "\n"


def export_diffusers(model, out: Path, nfe: int | None = None) -> Path:
    """Write `model` (a checkpoint folder) as a diffusers pipeline folder `out` whose
    FewstepPipeline reproduces `fewstep sample` (card's sampler, grid, AFS, clip; --nfe for SFD-v)."""
    require_diffusers()
    import diffusers

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FewstepError(f"{option('out', out)}: a file of that name exists; expected a new folder")
    if out.exists() and any(out.iterdir()):
        raise FewstepError(f"{option('out', out)}: the folder exists and is not empty; choose a new folder")
    ckpt = load_checkpoint(model)
    den, card = ckpt.denoiser, ckpt.card
    plan = resolve_sampler(ckpt, nfe)
    if plan["solver_options"]:
        raise FewstepError(f"export: the model's sampler uses {', '.join(sorted(plan['solver_options']))} "
                           f"({plan['name']} on its scheduler's timesteps), which the "
                           "exported pipeline does not implement; the diffusers folder it was imported from already "
                           "samples this way")
    if plan["name"] not in EXPORT_SOLVERS:
        raise FewstepError(f"export: the model's sampler is {plan['name']!r}; the exported pipeline implements "
                           f"{', '.join(EXPORT_SOLVERS)} (the samplers of SFD, SFDDM and progressive students and "
                           "of fewstep's teachers)")
    kind = den.net.config.get("type")
    diffusers_net = kind in DIFFUSERS_NETS
    if not diffusers_net and kind not in CUSTOM_NETS:
        raise FewstepError(f"export: network type {kind!r} cannot be exported; supported: "
                           f"{', '.join(DIFFUSERS_NETS)}, {', '.join(CUSTOM_NETS)}")
    step = plan["step"] if den.has_step_condition else None
    if den.has_step_condition and step is None:
        step = len(plan["sigmas"])
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_exports(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    # held while the folder is built, so that another export never takes it for a killed one's leftovers
    lock = RunLock(tmp).acquire()
    try:
        net, folded = _fold_for_export(den.net, step)
        lora = None
        if "lora" in den.net.config:  # a LoRA student: its adapter as a diffusers LoRA file, and fused for the pipeline
            lora = {**den.net.config["lora"], "file": None}
            if den.net.config["type"] in PIPELINE_LORA and den.net.step_cond is None:
                lora["file"] = str(export_lora(den.net, tmp / "lora").relative_to(tmp))
            net = fuse_lora(net if net is not den.net else copy.deepcopy(net).cpu().float())
        if diffusers_net:
            component = _write_diffusers_unet(net, tmp / "unet")
        else:
            component = _write_custom_net(net, kind, tmp / "unet")
        parts, part_spec = _write_components(den, tmp)
        shape = list(sample_shape(card))
        data = card.get("data") or {}
        sampler = {
            "format": EXPORT_FORMAT, "version": 1,
            "solver": plan["name"], "eta": {"ddim": 0.0, "ddpm": 1.0}.get(plan["name"]),
            "lower_order_final": True,  # fewstep's DPM-Solver++ default (only DPM-Solver++ reads it)
            "sigmas": [float(s) for s in plan["sigmas"]], "nfe": int(plan["nfe"]), "afs": bool(plan["afs"]),
            "clip": plan["clip"], "scale": plan["scale"], "param": den.param,
            "sigma_data": float(den.schedule.sigma_data),
            "time_input": time_input_spec(den), "time_inputs": _grid_time_inputs(den, plan["sigmas"]),
            "step_condition": folded, "lora": lora,
            "sample_shape": shape, "num_classes": 0 if den.text is not None else den.num_classes,
            "image_shape": list(data.get("shape") or shape), **part_spec,
            "image": data.get("kind", "image" if len(shape) == 3 else "toy") == "image" and len(shape) == 3,
            "network": {"type": kind, "component": component,
                        **({"time_ids": den.net.config["time_ids"]} if "time_ids" in den.net.config else {})},
            "model": {"method": (card.get("method") or {}).get("name"), "fewstep_version": card.get("fewstep_version"),
                      "weights_sha256": card.get("weights_sha256"), "source_path": str(ckpt.path),
                      "teacher": card.get("teacher"), "data": data.get("name")},
        }
        index = {"_class_name": ["pipeline", "FewstepPipeline"], "_diffusers_version": diffusers.__version__,
                 "unet": component, **parts, "sampler": sampler}
        (tmp / "model_index.json").write_text(index_json(index))
        shutil.copyfile(PIPELINE_SOURCE, tmp / "pipeline.py")
        (tmp / "README.md").write_text(_readme(sampler, ckpt.path))
        _share(tmp)
        try:
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        except OSError as e:  # another export (or anything) filled `out` after the check above
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FewstepError(f"{option('out', out)}: another process wrote into the folder while this export ran; "
                               "choose a new folder") from None
        (out / LOCK_NAME).unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    return out


def remove_stale_exports(out: Path) -> list[Path]:
    """Delete the half-built folders that killed exports to `out` left beside it: those whose lock no live
    process holds (an export in progress holds its own)."""
    removed = []
    for d in out.parent.glob(f".{out.name}.export-*"):
        if not (d / LOCK_NAME).is_file():
            continue
        try:
            RunLock(d).acquire().release()
        except (FewstepError, OSError):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _share(folder: Path) -> None:
    """mkdtemp and safetensors make private (0700 / 0600) entries; an export is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _readme(s: dict, src) -> str:
    kind = s["network"]["type"]
    net = (f"a plain `{s['network']['component'][1]}` (`unet/`, saved with `save_pretrained`)" if kind in DIFFUSERS_NETS
           else f"fewstep's `{s['network']['type']}` network: its standalone source code in `unet/fewstep_net.py` "
                "(needs only torch, numpy and diffusers) and its weights in `unet/diffusion_pytorch_model.safetensors`")
    cond = ""
    if s["step_condition"]:
        sc = s["step_condition"]
        cond = (f"\nThe SFD-v step condition ({sc['kind']} kind) for N = {sc['step']} timestamps is folded into "
                f"{sc['folded_into']}: the network takes no step input.\n")
    if s.get("lora"):
        lo = s["lora"]
        cond += (f"\nA LoRA student (rank {lo['rank']}, alpha {lo['alpha']:g}, on {', '.join(lo['targets'])}): `unet/` holds "
                 "it with the adapter fused into the teacher's weights.")
        if lo["file"]:
            cond += (f" The adapter alone is `{lo['file']}`: `pipe.load_lora_weights(\"THIS_FOLDER/lora\")` loads it "
                     "into the teacher's own diffusers pipeline, whose network then is the student's; sample it on the "
                     "student's grid (the `sigmas` here, Euler" + (" with the analytical first step" if s["afs"] else "")
                     + "), which this folder's pipeline does.")
        cond += "\n"
    labels = (f"\nThe model is class-conditional ({s['num_classes']} classes): pass `class_labels` (an int or one per "
              "image); without them classes are drawn uniformly (from `seed` + 2, as `fewstep sample` does).\n"
              if s["num_classes"] else "")
    start = {"vp": "sqrt(1 + σ_max²)·noise", "flow": "(1 + σ_max)·noise, a flow's x_t = noise"}.get(
        s["scale"], "σ_max·noise")
    # a text model's call needs its prompt: the pipeline refuses one without
    prompt = 'prompt="a red bicycle", ' if "text" in s else ""
    call = (f'images = pipe({prompt}batch_size=16, seed=0).images    # PIL images (output_type="np" / "pt" / "raw")'
            if s["image"] else 'x = pipe(batch_size=16, seed=0, output_type="np").images  # (16, '
            + ", ".join(map(str, s["sample_shape"])) + ') samples')
    if "text" in s:
        call += ("\n# sample i takes prompt i mod their number; guidance_scale (default "
                 f"{s['text']['guidance']:g}) and negative_prompt as in diffusers")
    return f"""# A few-step sampler exported by fewstep

Exported from `{src}` ({s['model']['method']}). Network: {net}.
Sampler: {s['solver']} on a fixed grid of {len(s['sigmas'])} noise levels, {s['nfe']} network evaluations
(NFE){', analytical first step (AFS)' if s['afs'] else ''}; parameterization `{s['param']}`; time input:
{s['time_input']['rule']}; x0 clip: {s['clip']}. Everything the sampler needs is the `sampler` entry of
`model_index.json` (σ-space: x = x0 + σ·ε; the pipeline starts from {start}).
{cond}{labels}
## Load and run

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("THIS_FOLDER", custom_pipeline="THIS_FOLDER/pipeline.py",
                                         trust_remote_code=True)
{call}
```

Without diffusers' loader (still needs diffusers installed):

```python
import sys; sys.path.insert(0, "THIS_FOLDER")
from pipeline import load_pipeline
pipe = load_pipeline("THIS_FOLDER")
x = pipe({prompt}batch_size=16, seed=0, output_type="raw").images   # data range, exactly like `fewstep sample`
```

`trust_remote_code=True` is diffusers' consent to run this folder's code: `pipeline.py`{' and `unet/fewstep_net.py`' if kind not in DIFFUSERS_NETS else ''}.
`pipe(noise=z, output_type="raw")` with unit Gaussian noise `z` of shape (N, {', '.join(map(str, s['sample_shape']))})
returns what `fewstep sample` returns for that noise; `seed=S` draws the noise as `fewstep sample --seed S`
does{' (and the ancestral noise from S + 1)' if s['solver'] == 'ddpm' else ''}.
"""
