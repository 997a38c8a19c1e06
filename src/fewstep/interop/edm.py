"""NVlabs/edm network snapshots → fewstep checkpoints.

The snapshot is read by the allow-list unpickler (`edm_pickle`), so its embedded source code is
never run; the network is rebuilt by fewstep's own `edm_nets` and its weights loaded by their
original names. EDM's preconditioners map onto fewstep's Denoiser:

    EDMPrecond  → param "edm", continuous schedule, time code log(σ)/4, sigma_data from the snapshot
    VPPrecond   → param "eps", continuous schedule, time code (M−1)·t(σ) of the VP-SDE
    VEPrecond   → param "ve" (D = x + σ·F, unscaled input), time code log(σ/2)

The σ range is EDM's sampler default 0.002..80 clipped to the preconditioner's own range.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from fewstep.checkpoint import refuse_to_overwrite, save_checkpoint
from fewstep.hashing import sha256_file
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.interop.edm_pickle import EDMRecord, ModuleRecord, load_snapshot, module_state_dict
from fewstep.nets import build_net
from fewstep.schedule import Schedule

# EDM's sampler defaults (generate.py): Heun, ρ = 7, 18 steps from σ = 80 to 0.002, then to 0
SAMPLER_SIGMA_MIN, SAMPLER_SIGMA_MAX, SAMPLER_STEPS, SAMPLER_RHO = 0.002, 80.0, 18, 7.0

# constructor parameters of each preconditioner (positional order) and their defaults
PRECONDS = {
    "EDMPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                    "sigma_data", "model_type"),
                   dict(label_dim=0, use_fp16=False, sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5,
                        model_type="DhariwalUNet")),
    "VPPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "beta_d", "beta_min", "M",
                   "epsilon_t", "model_type"),
                  dict(label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5,
                       model_type="SongUNet")),
    "VEPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                   "model_type"),
                  dict(label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100.0, model_type="SongUNet")),
}
MODELS = {"SongUNet": "edm-songunet", "DhariwalUNet": "edm-dhariwalunet"}
# EDM's model parameters that fewstep names in its own way
RENAMED = {"img_resolution": "resolution", "label_dim": "num_classes"}


def _precond_record(obj) -> EDMRecord:
    if isinstance(obj, dict):
        if "ema" not in obj:
            raise FewstepError(f"EDM snapshot: a dict without an 'ema' entry (keys: {sorted(map(str, obj))[:8]}); "
                               "expected network-snapshot-*.pkl from NVlabs/edm")
        obj = obj["ema"]
    if not isinstance(obj, EDMRecord):
        raise FewstepError(f"EDM snapshot: expected an EDM network object, found {type(obj).__name__}")
    if obj.class_name == "iDDPMPrecond":
        raise FewstepError("EDM snapshot: iDDPMPrecond is not supported (its network predicts ε and a variance "
                           "on a rounded 1000-step table); supported: EDMPrecond, VPPrecond, VEPrecond")
    if obj.class_name not in PRECONDS:
        raise FewstepError(f"EDM snapshot: preconditioner {obj.class_name!r} is not supported; "
                           f"expected one of {', '.join(PRECONDS)}")
    return obj


def _precond_options(rec: EDMRecord) -> dict:
    names, defaults = PRECONDS[rec.class_name]
    if len(rec.init_args) > len(names):
        raise FewstepError(f"EDM snapshot: {rec.class_name} was built with {len(rec.init_args)} positional arguments")
    opts = dict(defaults)
    opts.update(zip(names, rec.init_args))
    opts.update({k: v for k, v in rec.init_kwargs.items() if k in names})
    for k in names:  # the object's own attributes are what it ran with
        if k in rec.state and isinstance(rec.state[k], (int, float, str, bool)):
            opts[k] = rec.state[k]
    return opts


def _model_config(rec: EDMRecord, label_dim: int, feature_layer: str | None) -> dict:
    model = (rec.state.get("_modules") or {}).get("model")
    if not isinstance(model, EDMRecord):
        raise FewstepError(f"EDM snapshot: {rec.class_name} holds no network under 'model'")
    if model.class_name not in MODELS:
        raise FewstepError(f"EDM snapshot: network {model.class_name!r} is not supported; "
                           f"expected one of {', '.join(MODELS)}")
    if model.init_args:
        raise FewstepError(f"EDM snapshot: {model.class_name} was built with positional arguments")
    cfg = {"type": MODELS[model.class_name]}
    for k, v in model.init_kwargs.items():
        cfg[RENAMED.get(k, k)] = list(v) if isinstance(v, tuple) else v
    if int(cfg.get("num_classes") or 0) != int(label_dim or 0):
        raise FewstepError(f"EDM snapshot: label_dim of {rec.class_name} ({label_dim}) and of its network "
                           f"({cfg.get('num_classes')}) differ")
    if feature_layer:
        cfg["feature_layer"] = feature_layer
    return cfg, model


def _schedule(name: str, opts: dict, rec: EDMRecord) -> tuple[Schedule, str]:
    if name == "EDMPrecond":
        lo, hi = float(opts["sigma_min"]), float(opts["sigma_max"])
        return Schedule.continuous(max(SAMPLER_SIGMA_MIN, lo), min(SAMPLER_SIGMA_MAX, hi),
                                   float(opts["sigma_data"])), "edm"
    if name == "VPPrecond":
        bd, bm, eps_t = float(opts["beta_d"]), float(opts["beta_min"]), float(opts["epsilon_t"])
        sigma = lambda t: math.sqrt(math.expm1(0.5 * bd * t**2 + bm * t))  # noqa: E731 (the VP-SDE's σ(t))
        lo, hi = rec.state.get("sigma_min", sigma(eps_t)), rec.state.get("sigma_max", sigma(1.0))
        return Schedule.continuous(max(SAMPLER_SIGMA_MIN, float(lo)), min(SAMPLER_SIGMA_MAX, float(hi)), 0.5,
                                   "vp", {"beta_d": bd, "beta_min": bm, "M": float(opts["M"])}), "eps"
    lo, hi = float(opts["sigma_min"]), float(opts["sigma_max"])
    return Schedule.continuous(max(SAMPLER_SIGMA_MIN, lo), min(SAMPLER_SIGMA_MAX, hi), 0.5, "ve"), "ve"


# scalar attributes EDM's modules keep; where a snapshot's object has one, the rebuilt module must agree
CHECKED_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "emb_channels", "up", "down",
                 "fused_resample", "num_groups", "eps", "num_heads", "skip_scale", "adaptive_scale", "dropout",
                 "num_channels", "max_positions", "endpoint")


def _check_structure(rec, module: torch.nn.Module, path: str = "model") -> None:
    """The snapshot's module tree has the rebuilt network's classes, sub-modules and settings, so the
    weights that load by name also mean what fewstep's implementation computes with them."""
    want = type(module).__name__
    if not isinstance(rec, (EDMRecord, ModuleRecord)) or rec.class_name != want:
        found = rec.class_name if isinstance(rec, (EDMRecord, ModuleRecord)) else type(rec).__name__
        raise FewstepError(f"EDM snapshot: {path} is a {found!r}, where EDM's architecture has a {want!r}; "
                           "this network is not one fewstep can rebuild")
    children = {k: v for k, v in (rec.state.get("_modules") or {}).items() if v is not None}
    ours = {k: v for k, v in module._modules.items() if v is not None and k != "step_cond"}
    if set(children) != set(ours):
        extra, missing = sorted(set(children) - set(ours)), sorted(set(ours) - set(children))
        raise FewstepError(f"EDM snapshot: {path} has sub-modules {extra or '-'} that EDM's {want} does not build "
                           f"here, and lacks {missing or '-'}")
    for k in CHECKED_ATTRS:
        if k in rec.state and k in module.__dict__:
            a, b = rec.state[k], module.__dict__[k]
            same = (math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
                    if isinstance(a, (int, float)) and isinstance(b, (int, float)) else a == b)
            if not same:
                raise FewstepError(f"EDM snapshot: {path}.{k} is {a!r} in the snapshot but {b!r} in EDM's {want} "
                                   "built from its constructor arguments; refusing a network that differs")
    for k, child in ours.items():
        _check_structure(children[k], child, f"{path}.{k}")


def denoiser_from_snapshot(obj, feature_layer: str | None = None) -> tuple[Denoiser, dict]:
    """(Denoiser with the snapshot's weights loaded strictly, the card's "source" facts)."""
    rec = _precond_record(obj)
    opts = _precond_options(rec)
    cfg, model = _model_config(rec, opts["label_dim"], feature_layer)
    if cfg.get("resolution") != opts["img_resolution"] or cfg.get("in_channels") != opts["img_channels"]:
        raise FewstepError(f"EDM snapshot: the network's resolution/channels ({cfg.get('resolution')}, "
                           f"{cfg.get('in_channels')}) differ from {rec.class_name}'s")
    if cfg.get("out_channels", cfg["in_channels"]) != cfg["in_channels"]:
        raise FewstepError(f"EDM snapshot: out_channels={cfg['out_channels']} differs from in_channels="
                           f"{cfg['in_channels']}; only networks that predict one image are supported")
    if opts.get("model_type") not in (None, model.class_name):
        raise FewstepError(f"EDM snapshot: {rec.class_name} names model_type {opts['model_type']!r} but holds a "
                           f"{model.class_name}")
    net = build_net(cfg)
    _check_structure(model, net)
    sd = {k: v.float() for k, v in module_state_dict(model).items()}  # use_fp16 nets still run in float32
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise FewstepError(f"EDM snapshot: the weights do not fit {model.class_name}({cfg}): "
                           f"{str(e).strip().splitlines()[-1][:300]}") from None
    schedule, param = _schedule(rec.class_name, opts, rec)
    den = Denoiser(net, schedule, param).eval()
    init = {RENAMED.get(k, k): (list(v) if isinstance(v, tuple) else v) for k, v in model.init_kwargs.items()}
    source = {"precond": rec.class_name, "model_type": model.class_name, "init_kwargs": init,
              "precond_kwargs": {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                 for k, v in opts.items()},
              "sigma_range": [schedule.sigma_min, schedule.sigma_max],
              # the pickle stores these classes' source code; it is never run (fewstep's own classes replace it)
              "stored_source_sha256": {r.class_name.rsplit(".", 1)[-1]: r.source_sha256 for r in (rec, model)
                                       if r.source_sha256}}
    return den, source


def default_sampler() -> dict:
    """EDM's own sampler (Heun, ρ = 7, 18 steps then σ = 0) in fewstep's card form: 35 NFE."""
    return {"name": "heun", "nfe": 2 * SAMPLER_STEPS - 1, "grid": "polynomial", "rho": SAMPLER_RHO,
            "final_zero": True, "clip": None}


def import_edm_snapshot(src: Path, out: Path, feature_layer: str | None = None) -> Path:
    """Read an NVlabs/edm snapshot (its 'ema' network, or a bare preconditioner object) safely and write
    it as a fewstep checkpoint folder `out`."""
    src, out = Path(src), Path(out)
    refuse_to_overwrite(out)
    snapshot = load_snapshot(src)
    try:
        den, source = denoiser_from_snapshot(snapshot, feature_layer)
    except FewstepError as e:
        raise FewstepError(f"{src}: {e}") from None
    net = den.net.config
    stored = source.get("stored_source_sha256") or {}
    if stored:
        print(f"fewstep: note: {src.name} stores the source code of {' and '.join(stored)}; it is never run: "
              "fewstep's own implementation replaces it (the stored code's sha256 is on the card)", file=sys.stderr)
    card = {"method": {"name": "imported"},
            "source": {"format": "edm-snapshot", "path": str(src.resolve()), "sha256": sha256_file(src), **source},
            "sampler": default_sampler(), "teacher": None,
            "data": {"kind": "image", "shape": [net["in_channels"], net["resolution"], net["resolution"]],
                     "name": f"edm:{src.name}", "num_classes": int(net.get("num_classes") or 0)}}
    return save_checkpoint(out, den, card)
