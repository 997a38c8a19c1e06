"""Semantic consistency of two models: the same initial noises through both, PSNR of matched pairs against
shuffled ones (SFDDM's paper reports it for teacher and student), and noises interpolated between two seeds
(slerp or linear) for interpolation strips. Works on any fewstep model; used by `fewstep compare`,
`fewstep interpolate` and the bench's SFDDM consistency check."""
from __future__ import annotations

import torch

from fewstep.errors import FewstepError, option
from fewstep.sampling import check_memory, sample, sample_shape
from fewstep.solvers import STOCHASTIC


def deterministic_sampler(card: dict) -> str | None:
    """The sampler to use for a model when the same noise must give the same output: its card's
    default unless that is stochastic (DDPM ancestral), then DDIM η = 0 on the same grid."""
    name = card.get("sampler", {}).get("name")
    return "ddim" if name in STOCHASTIC else None


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR (dB) of data in [-1, 1] (peak-to-peak 2); inputs clamped to the range first."""
    if a.shape != b.shape:
        raise FewstepError(f"PSNR: sample shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    lo, hi = -peak_to_peak / 2, peak_to_peak / 2
    mse = (a.float().clamp(lo, hi) - b.float().clamp(lo, hi)).square().reshape(len(a), -1).mean(1)
    return 10 * torch.log10(peak_to_peak**2 / mse.clamp(min=1e-12))


def pair_stats(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> dict:
    """PSNR and MSE of matched pairs (a[i], b[i]) against shuffled pairs (no sample with its own match)."""
    n = len(a)
    if n < 2 or len(b) != n:
        raise FewstepError(f"compare: expected two equal sets of at least 2 samples, got {len(a)} and {len(b)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # a[perm[i]] against b[perm[i+1]]: a derangement, so no pair is accidentally matched
    sa, sb = a[perm], b[perm.roll(-1)]
    pm, ps = psnr(a, b), psnr(sa, sb)
    mm = (a.float() - b.float()).square().reshape(n, -1).mean(1)
    ms = (sa.float() - sb.float()).square().reshape(n, -1).mean(1)
    return {"n": n, "psnr_matched": float(pm.mean()), "psnr_matched_std": float(pm.std()),
            "psnr_shuffled": float(ps.mean()), "psnr_shuffled_std": float(ps.std()),
            "mse_matched": float(mm.mean()), "mse_shuffled": float(ms.mean())}


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noises (flattened angle), for a 1-D tensor of t in [0, 1]."""
    a, b = z0.double().reshape(-1), z1.double().reshape(-1)
    cos = (a @ b / (a.norm() * b.norm())).clamp(-1, 1)
    theta = torch.arccos(cos)
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    if float(theta) < 1e-6:  # parallel noises: slerp degenerates to lerp
        out = (1 - t) * a + t * b
    else:
        out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return out.reshape(-1, *z0.shape).to(z0.dtype)


def interpolation_noises(shape, seeds: tuple[int, int], frames: int, mode: str = "slerp") -> torch.Tensor:
    """`frames` noises from seed a's noise to seed b's (each the first noise `fewstep sample --seed`
    draws), by slerp or linear interpolation."""
    if frames < 2:
        raise FewstepError(f"{option('frames', frames)}: expected at least 2 frames")
    if mode not in ("slerp", "linear"):
        raise FewstepError(f"{option('mode', mode)}: expected slerp or linear")
    za, zb = (torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s)))[0] for s in seeds)
    t = torch.linspace(0, 1, frames, dtype=torch.float64)
    if mode == "slerp":
        return slerp(za, zb, t)
    tt = t.reshape(-1, *([1] * len(shape))).to(za.dtype)
    return (1 - tt) * za + tt * zb


def sample_same_noise(ckpt, noise: torch.Tensor, seed: int = 0, sampler: str | None = None,
                      nfe: int | None = None, batch_size: int = 500) -> tuple[torch.Tensor, dict]:
    """Samples of a loaded model from given unit noises, with its deterministic sampler by default."""
    shape = tuple(sample_shape(ckpt.card))
    if tuple(noise.shape[1:]) != shape:
        raise FewstepError(f"model {ckpt.path}: samples have shape {list(shape)}, the noises {list(noise.shape[1:])}")
    sampler = sampler or deterministic_sampler(ckpt.card)
    return sample(ckpt, len(noise), seed=seed, nfe=nfe, sampler=sampler, noise=noise, batch_size=batch_size,
                  progress=False, return_info=True)


def compare_models(a, b, n: int = 256, seed: int = 0, sampler_a: str | None = None, nfe_a: int | None = None,
                   sampler_b: str | None = None, nfe_b: int | None = None, batch_size: int = 500):
    """Semantic consistency: the same n initial noises through two loaded models.

    Returns (samples_a, samples_b, stats) with PSNR / MSE of matched against shuffled pairs and
    each model's sampler and NFE.
    """
    sa, sb = tuple(sample_shape(a.card)), tuple(sample_shape(b.card))
    if sa != sb:
        raise FewstepError(f"compare: the models draw different shapes, {list(sa)} and {list(sb)}")
    if n < 2:
        raise FewstepError(f"{option('n', n)}: expected at least 2 samples to compare")
    check_memory(n, sa)
    noise = torch.randn((n, *sa), generator=torch.Generator().manual_seed(seed))
    xa, ia = sample_same_noise(a, noise, seed, sampler_a, nfe_a, batch_size)
    xb, ib = sample_same_noise(b, noise, seed, sampler_b, nfe_b, batch_size)
    stats = pair_stats(xa, xb, seed=seed)
    stats.update({"seed": seed, "a": {"model": str(a.path), "sampler": ia["sampler"], "nfe": ia["nfe"]},
                  "b": {"model": str(b.path), "sampler": ib["sampler"], "nfe": ib["nfe"]}})
    return xa, xb, stats
