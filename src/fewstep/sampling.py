"""Sampling a loaded model: its card's default sampler, or any solver, grid and NFE the user picks.

A card's "sampler" section takes one of three forms:
  {"name", "nfe", "grid", "rho", "final_zero", "clip"}          grid built on demand (teachers)
  {"name", "nfe", "sigmas": [...], "afs", ...}                   one fixed grid (SFD, SFDDM)
  {"name", "nfe", "grids": {"2": [...], ...}, "afs", ...}        one grid per trained NFE (SFD-v)

A teacher's grid may be a diffusers scheduler's own timestep spacing ("leading", "trailing", "linspace",
with "steps_offset" and "final_sigma"): the σ of the table entries the scheduler evaluates, every step one
evaluation. Imported diffusers models default to their scheduler's sampler this way, with the pipelines'
"scale": "vp": the first state is the noise at the VP scale, x = sqrt(1 + σ²)·ε, where fewstep's own
convention is σ·ε, and a last state above σ = 0 is returned at the VP scale, x / sqrt(1 + σ²), as diffusers
returns its latents; for DDPM, the scheduler's "variance".

A flow-matching teacher's grid is its FlowMatchEulerDiscreteScheduler's ("grid": "flow", with the card's
"flow" settings: training steps and shift, or Flux's mu), at "scale": "flow": the first state is the pipeline's
latents x_t = ε read in σ-space, x = (1 + σ)·x_t, and the last is returned as x_t. DDIM there is the
scheduler's Euler step x_t' = x_t + (t' − t)·v (both give (1 − t')·x̂0 + t'·ε̂).
"""
from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

from fewstep.checkpoint import Checkpoint
from fewstep.denoiser import prompts_needed
from fewstep.errors import FewstepError, on_command_line, option, options
from fewstep.flow_grid import flow_scheduler_grid
from fewstep.schedule import SCHEDULER_SPACINGS, check_grid, ddim_targets, make_grid, scheduler_grid
from fewstep.solvers import DDPM_VARIANCES, STOCHASTIC, solve, steps_for_nfe

SCALES = ("sigma", "vp", "flow")
# solvers that step from the flow grid's first point (t = 1, σ ≈ 6.7e7) in float32 without cancelling: each
# step's state is x̂0 + (σ'/σ)·(x − x̂0), so x̂0 is never subtracted from a state of size σ
FLOW_SOLVERS = ("ddim", "dpmpp2m", "dpmpp3m")
# solvers a scheduler spacing applies to (Heun's two evaluations per step have no scheduler counterpart here)
SPACED_SOLVERS = ("ddim", "ddpm", "dpmpp2m", "dpmpp3m", "euler", "ipndm")


def sample_shape(card: dict) -> tuple:
    """(C, H, W) for image networks (every one has `resolution` and `in_channels` in its config),
    (dim,) for flat ones."""
    net = card["net"]
    if "resolution" in net:
        return (net["in_channels"], net["resolution"], net["resolution"])
    return (net["dim"],)


def grid_for(denoiser, sampler: str, nfe: int, kind: str = "polynomial", rho: float = 7.0,
             final_zero: bool = True, afs: bool = False, sigma_min: float | None = None,
             sigma_max: float | None = None) -> torch.Tensor:
    """The σ grid that gives `sampler` exactly `nfe` evaluations on this model."""
    steps = steps_for_nfe(sampler, nfe, final_zero) + (1 if afs else 0)
    smin = sigma_min if sigma_min is not None else denoiser.sigma_min
    smax = sigma_max if sigma_max is not None else denoiser.sigma_max
    points = steps if final_zero else steps + 1
    if points < 2:
        # a single denoise step from σ_max straight to 0
        return torch.tensor([smax, 0.0], dtype=torch.float64)
    g = make_grid(kind, points, smin, smax, rho, schedule=denoiser.schedule)
    return torch.cat([g, torch.zeros(1, dtype=torch.float64)]) if final_zero else g


def resolve_sampler(ckpt: Checkpoint, nfe: int | None = None, sampler: str | None = None,
                    grid: str | None = None, rho: float | None = None, final_zero: bool | None = None,
                    clip="auto") -> dict:
    """The concrete plan for a sampling run: solver name, σ grid, NFE, AFS, clip and step condition.

    `final_zero` (teachers' grids only; None: the card's): end with a denoise from σ_min to 0, which costs one
    of the NFE. The field's tables count NFE without it (n steps from σ_max to σ_min). `clip`: the bound x0 is
    clipped to, None for none, or "auto": the card's for its own sampler. An imported model's clip is its
    scheduler's clip_sample, so another sampler clips as its diffusers scheduler made from the same config
    would: DDIM and DDPM per clip_sample, the others never."""
    plan = _plan(ckpt, nfe, sampler, grid, rho, final_zero)
    if clip != "auto":
        plan["clip"] = None if clip is None else float(clip)
    elif plan["name"] != ckpt.sampler.get("name") and ckpt.sampler.get("scheduler") and "flow" not in ckpt.sampler:
        cfg = (ckpt.card.get("source") or {}).get("scheduler_config") or {}
        clipping = plan["name"] in ("ddim", "ddpm") and cfg.get("clip_sample", True)
        plan["clip"] = float(cfg.get("clip_sample_range", 1.0)) if clipping else None
    return plan


def _plan(ckpt: Checkpoint, nfe, sampler, grid, rho, final_zero) -> dict:
    spec = dict(ckpt.sampler)
    name = sampler or spec.get("name", "dpmpp2m")
    afs = bool(spec.get("afs", False))
    clip = spec.get("clip")
    step = None
    if final_zero is not None and ("grids" in spec or "sigmas" in spec):
        raise FewstepError(f"{option('final_denoise')}: this model samples on the fixed grid it was distilled for")
    if "grids" in spec:  # SFD-v: one model, a grid per trained NFE
        choices = sorted(int(k) for k in spec["grids"])
        nfe = int(nfe if nfe is not None else spec.get("nfe", choices[0]))
        if nfe not in choices:
            raise FewstepError(f"{option('nfe', nfe)}: this model was trained for NFE {choices} only; pick one of them")
        sigmas = torch.tensor(spec["grids"][str(nfe)], dtype=torch.float64)
        step = len(sigmas)
    elif "sigmas" in spec:  # a fixed grid: the distilled student's own timestamps
        sigmas = torch.tensor(spec["sigmas"], dtype=torch.float64)
        fixed_nfe = int(spec["nfe"])
        if nfe is not None and int(nfe) != fixed_nfe:
            raise FewstepError(f"{option('nfe', nfe)}: this model samples with a fixed grid of NFE {fixed_nfe}; "
                               f"leave {option('nfe')} out (or distil again for another NFE)")
        if grid is not None:
            raise FewstepError(f"{option('grid', grid)}: this model has a fixed sampling grid from its distillation")
        nfe = fixed_nfe
        step = spec.get("step")  # a second-stage student keeps the step condition it started from
    else:
        nfe = int(nfe if nfe is not None else spec.get("nfe", 50))
        kind = grid or spec.get("grid", "polynomial")
        if grid is None and kind in SCHEDULER_SPACINGS and not replays_spacing(name, kind):
            # the card's spacing is its scheduler's; a sampler that does not run it as diffusers does takes its
            # own default grid (asked for by name, the spacing is used as fewstep spaces it)
            kind = "polynomial"
        if grid is None and kind == "flow" and name not in FLOW_SOLVERS:
            kind = "polynomial"  # as for a scheduler spacing: another solver takes fewstep's default grid
        if kind in SCHEDULER_SPACINGS:
            return _scheduler_plan(ckpt, spec, name, nfe, kind, final_zero)
        if kind == "flow":
            return _flow_plan(spec, name, nfe, final_zero)
        final_zero = spec.get("final_zero", True) if final_zero is None else final_zero
        sigmas = grid_for(ckpt.denoiser, name, nfe, kind, rho or spec.get("rho", 7.0), final_zero=final_zero, afs=afs)
        if name == "heun":
            # 2 evaluations per step, 1 for a final step to σ = 0: not every NFE is reachable
            used = 2 * (len(sigmas) - 1) - (1 if float(sigmas[-1]) == 0 else 0)
            if used != nfe:
                raise FewstepError(f"{option('nfe', nfe)}: heun uses 2 evaluations per step"
                                   f"{' and 1 for the final denoise' if float(sigmas[-1]) == 0 else ''}, "
                                   f"so it cannot use exactly {nfe}; try {option('nfe', used)} or {used + 2}")
    if afs and name != "euler":
        raise FewstepError(f"sampler {name!r}: this model was distilled for Euler with an analytical first step")
    # a fixed grid may name DPM-Solver++'s final orders (SFD's ceiling: the teacher as SFD's targets were solved)
    options = {"lower_order_final": spec["lower_order_final"]} if "sigmas" in spec and "lower_order_final" in spec else {}
    return {"name": name, "sigmas": check_grid(sigmas), "nfe": nfe, "afs": afs, "clip": clip, "step": step,
            "scale": _scale(spec), "solver_options": options}


def replays_spacing(name: str, spacing: str) -> bool:
    """Whether solver `name` on a scheduler spacing steps as its diffusers scheduler does (EulerDiscreteScheduler
    on linspace takes unrounded timesteps, which fewstep does not)."""
    return name in SPACED_SOLVERS and not (name == "euler" and spacing == "linspace")


def _scale(spec: dict) -> str:
    scale = spec.get("scale", "sigma")
    if scale not in SCALES:
        raise FewstepError(f"sampler scale {scale!r}: expected one of {', '.join(SCALES)}")
    return scale


def _scheduler_plan(ckpt: Checkpoint, spec: dict, name: str, nfe: int, spacing: str, final_zero) -> dict:
    """A teacher's plan on a diffusers scheduler's timestep spacing (see the module's docstring)."""
    if name not in SPACED_SOLVERS:
        raise FewstepError(f"{option('grid', spacing)}: a scheduler spacing is for {', '.join(SPACED_SOLVERS)}; "
                           f"sampler {name!r} needs polynomial, logsnr, uniform or discrete")
    if final_zero is not None:
        raise FewstepError(f"{option('final_denoise')}: grid {spacing!r} ends where its scheduler's "
                           "last step lands (the card's final_sigma), with no extra denoise")
    sched = ckpt.denoiser.schedule
    # where the last step lands is a setting of the card's own scheduler (set_alpha_to_one, final_sigmas_type);
    # another solver's scheduler made from the same config lands on σ = 0 by default, DDPMScheduler always
    final_sigma = spec.get("final_sigma", "zero") if name == spec.get("name") and name != "ddpm" else "zero"
    family = "dpm" if name.startswith("dpmpp") else "ddim"
    sigmas, timesteps = scheduler_grid(sched, spacing, nfe, int(spec.get("steps_offset", 0)), final_sigma, family)
    options = {}
    if name == "ddim":
        final = 0.0 if final_sigma == "zero" else float(sched.sigmas[0])
        targets = ddim_targets(sched, timesteps, final)
        if targets is not None:
            options["targets"] = targets
    if name == "ddpm":
        variance = spec.get("variance", "fixed_small")
        if variance not in DDPM_VARIANCES:
            raise FewstepError(f"sampler variance {variance!r}: expected one of {', '.join(DDPM_VARIANCES)}")
        # DDPMScheduler adds its fixed_large variance on every step that starts above timestep 0
        options.update(variance=variance, noise_at_last=variance == "fixed_large" and timesteps[-1] > 0)
    # EulerDiscreteScheduler starts from σ_max·noise on these spacings (sqrt(1 + σ_max²)·noise on leading)
    scale = "sigma" if name == "euler" and spacing in ("linspace", "trailing") else _scale(spec)
    return {"name": name, "sigmas": check_grid(sigmas), "nfe": nfe, "afs": False, "clip": spec.get("clip"),
            "step": None, "scale": scale, "solver_options": options, "timesteps": timesteps}


def _flow_plan(spec: dict, name: str, nfe: int, final_zero) -> dict:
    """A flow-matching teacher's plan on its scheduler's grid (see the module's docstring)."""
    if name not in FLOW_SOLVERS:
        raise FewstepError(f"{option('grid', 'flow')}: starts at pure noise (t = 1), where sampler {name!r} would "
                           f"cancel the state in float32; use {', '.join(FLOW_SOLVERS)} on it, or "
                           f"{option('grid', 'polynomial')}")
    if final_zero is not None:
        raise FewstepError(f"{option('final_denoise')}: grid 'flow' ends as its scheduler's does, at t = 0")
    flow = spec.get("flow") or {}
    sigmas, t = flow_scheduler_grid(nfe, int(flow.get("T", 1000)), float(flow.get("shift", 1.0)), flow.get("mu"),
                                    flow.get("rule", "scheduler"))
    return {"name": name, "sigmas": check_grid(sigmas), "nfe": nfe, "afs": False, "clip": None, "step": None,
            "scale": "flow", "solver_options": {}, "timesteps": t}


def start_scale(plan: dict) -> float:
    """What a unit noise is multiplied by to be the first state: σ_max, sqrt(1 + σ_max²) at the VP scale, or
    1 + σ_max at a flow's."""
    s0 = float(plan["sigmas"][0])
    scale = plan.get("scale")
    return (1 + s0**2) ** 0.5 if scale == "vp" else 1 + s0 if scale == "flow" else s0


def end_scale(plan: dict) -> float:
    """What the last state is divided by: 1, or at the VP scale sqrt(1 + σ²) (a flow's 1 + σ) of where the last
    step landed."""
    if plan.get("scale") not in ("vp", "flow"):
        return 1.0
    targets = plan["solver_options"].get("targets")
    last = float(targets[-1] if targets is not None else plan["sigmas"][-1])
    return 1 + last if plan["scale"] == "flow" else (1 + last**2) ** 0.5


def check_memory(n: int, shape: tuple) -> None:
    """Refuse a sample count whose noise and outputs (float32, held at once) exceed this machine's memory."""
    need = 2 * 4 * n * math.prod(shape)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return
    if need > total:
        raise FewstepError(f"{option('n', n)}: {n} samples of shape {list(shape)} need {need / 2**30:.1f} GiB at "
                           f"once, more than this machine's {total / 2**30:.1f} GiB; draw them in several runs (other "
                           f"{option('seed')})")


def class_labels_for(den, n: int, class_label=None, seed: int = 0) -> tuple[torch.Tensor | None, object]:
    """(labels, description) of n samples: None for an unconditional model; for a conditional one
    the given class (an int, or n labels), else classes drawn uniformly from the seed."""
    if not den.num_classes:
        if class_label is not None:
            raise FewstepError(f"{option('class_label', class_label)}: this model is not class-conditional")
        return None, None
    if class_label is None:
        gen = torch.Generator().manual_seed(seed + 2)
        return torch.randint(den.num_classes, (n,), generator=gen), "uniform"
    if isinstance(class_label, int):
        if not 0 <= class_label < den.num_classes:
            raise FewstepError(f"{option('class_label', class_label)}: expected a class in 0..{den.num_classes - 1}")
        return torch.full((n,), class_label, dtype=torch.long), class_label
    return den.check_labels(class_label, n), "given"


def prompt_labels(den, n: int, prompts, negative_prompt: str | None = None, guidance: float | None = None):
    """A text model's conditioning for this run (the card's guidance and negative prompt unless given) and the
    label of each of n samples: sample i takes prompt i mod len(prompts). (None, None) for other models."""
    if den.text is None:
        if prompts or negative_prompt is not None or guidance is not None:
            raise FewstepError(f"{options('prompts', 'negative_prompt', 'guidance')}: this model is not "
                               "text-conditioned")
        return None, None
    if not prompts:
        raise prompts_needed()
    if isinstance(prompts, str):
        prompts = [prompts]
    text = den.encode_prompts(list(prompts), negative_prompt, guidance)
    return torch.arange(n) % len(text.prompts), text


@torch.no_grad()
def sample(ckpt: Checkpoint, n: int, seed: int = 0, nfe: int | None = None, sampler: str | None = None,
           grid: str | None = None, rho: float | None = None, batch_size: int = 500,
           noise: torch.Tensor | None = None, progress: bool = True, return_info: bool = False,
           class_label=None, final_zero: bool | None = None, max_seconds: float | None = None,
           prompts: list[str] | None = None, negative_prompt: str | None = None, guidance: float | None = None,
           decode: bool = True, clip="auto"):
    """Draw n samples with the same seed → the same samples (noise is drawn on the CPU at once).

    A class-conditional model samples `class_label` (an int or n labels), or uniform classes. A
    text-conditioned one samples `prompts` (sample i the prompt i mod their number) with classifier-free
    guidance (`guidance`, `negative_prompt`; the card's by default). A latent model's samples are decoded
    into images unless `decode` is False (then latents). `max_seconds`: after the first batch, refuse a run
    whose projected time exceeds it."""
    if n < 1:
        raise FewstepError(f"n={n}: expected at least one sample")
    latent = (ckpt.card.get("data") or {}).get("latent_shape") is not None
    check_memory(n, tuple(ckpt.card["data"]["shape"]) if latent and decode else sample_shape(ckpt.card))
    plan = resolve_sampler(ckpt, nfe, sampler, grid, rho, final_zero, clip)
    den = ckpt.denoiser
    device = next(den.parameters()).device
    sigmas = plan["sigmas"]
    if noise is None:
        noise = torch.randn((n, *sample_shape(ckpt.card)), generator=torch.Generator().manual_seed(seed))
    labels, text = prompt_labels(den, n, prompts, negative_prompt, guidance)
    if labels is None:
        labels, classes = class_labels_for(den, n, class_label, seed)
    elif class_label is not None:
        raise FewstepError(f"{option('class_label', class_label)}: this model is text-conditioned (give "
                           f"{option('prompts')})")
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    out, t0 = [], time.perf_counter()
    bar = tqdm(total=n, desc=f"sampling {plan['name']} NFE {plan['nfe']}", unit="img", disable=not progress,
               leave=False)
    for i in range(0, n, batch_size):
        model = den.with_step(plan["step"], None if labels is None else labels[i:i + batch_size].to(device), text)
        x = noise[i:i + batch_size].to(device) * start_scale(plan)
        kw = {"afs": True} if plan["afs"] else {}
        r = solve(plan["name"], model, x, sigmas.to(device), generator=gen if plan["name"] in STOCHASTIC else None,
                  clip=plan["clip"], **kw, **plan["solver_options"])
        if r.nfe != plan["nfe"]:
            raise RuntimeError(f"internal NFE mismatch: planned {plan['nfe']}, solver used {r.nfe}")
        x = r.x / end_scale(plan)
        out.append((den.decode(x) if decode else x).float().cpu())
        bar.update(len(x))
        if max_seconds is not None and i == 0 and n > len(x):
            projected = (time.perf_counter() - t0) * n / len(x)
            if projected > max_seconds:
                bar.close()
                anyway = "pass --yes to run it anyway" if on_command_line() else "give a larger max_seconds"
                raise FewstepError(f"{option('n', n)}: about {projected / 3600:.1f} hours on this machine (the first "
                                   f"{len(x)} samples took {time.perf_counter() - t0:.2f} s at NFE {plan['nfe']}); "
                                   f"{anyway}, or draw fewer samples")
    bar.close()
    x = torch.cat(out)
    if not torch.isfinite(x).all():
        raise FewstepError("sampling produced non-finite values; the model or its sampler settings are broken")
    info = {"sampler": plan["name"], "nfe": plan["nfe"], "afs": plan["afs"], "clip": plan["clip"], "n": n, "seed": seed,
            "sigmas": [float(s) for s in sigmas], "seconds": time.perf_counter() - t0}
    if "timesteps" in plan:
        info["timesteps"] = plan["timesteps"]
    if den.text is not None:
        info.update(prompts=list(text.prompts), negative_prompt=text.negative_prompt, guidance=text.guidance)
    elif labels is not None:
        info["class"] = classes
        info["labels"] = labels.tolist()
    if den.codec is not None:
        info["decoded"] = decode
    return (x, info) if return_info else x

