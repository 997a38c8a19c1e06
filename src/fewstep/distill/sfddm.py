"""SFDDM — Single-fold Distillation (Hong et al., ECML PKDD 2025).

The student is a T'-step discrete VP model whose forward chain is the teacher's chain read at an
increasing index set φ: ᾱ'_s = ᾱ[φ_s]. By telescoping, the student's noisy input at step s is the
teacher's noisy input at φ_s, so one fold of training needs no unrolled teacher chain:

    x0 ~ data, s ~ U{0..T'-1}, ε ~ N(0, I), x = x0 + σ'_s·ε        (σ-space; σ'_s = σ[φ_s])
    loss = |y_S − y_T| + λ·|h_S − h_T|                             (raw outputs y, penultimate maps h)

The student's σ table is exactly the teacher's at φ, and it refuses any other σ ("exact table").
It samples with its own T'-step chain: DDPM ancestral (default) or DDIM η = 0.

The ceiling. The loss is minimised by a student that copies the teacher at φ, so the best a student
can score is the teacher's own T'-step chain on φ (`teacher_on_phi`, with DDPM ancestral — the
authors' FID protocol — or DDIM η = 0). The bench puts that row beside every SFDDM row.

Training as the authors train it (their code): no dropout in the student (ours is off by default:
a teacher-initialised student then starts at exactly zero loss, also in train mode), no gradient
clipping, Adam 2e-4, about a fifth of the teacher's training samples (`default_iterations`). An EMA
of the student's weights is available as our deviation. Every iteration also measures the
student-vs-teacher ε error per student step (`eps_mse_by_step` in metrics.jsonl, binned when
T' > 16; the card keeps the last values) so a user sees which steps are not learnt yet.

Index sets: `trailing` (ours) φ_s = round((s+1)·T/T') − 1; `leading` (the authors' code)
φ_s = s·⌊T/T'⌋, which stops short of the teacher's noisiest step (918 of 1023 for T' = 10);
`spread` φ_s = ⌊s·T/T'⌋ (fewstep's "leading" before it followed the authors; the cards of models
made with it say "leading" and carry their φ, which is what loading uses, so they load and sample
as before); or an explicit list.

The semantic-consistency tools the paper reports (PSNR of matched against shuffled pairs, interpolation
between two noises) work on any two models and live in fewstep.compare.
"""
from __future__ import annotations

import argparse
import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fewstep import argtypes as A
from fewstep.checkpoint import Checkpoint, load_checkpoint, read_card, teacher_reference
from fewstep.compare import compare_models, interpolation_noises, sample_same_noise
from fewstep.denoiser import Denoiser
from fewstep.distill.common import distill_data, distill_labels, trained_shape
from fewstep.errors import FewstepError
from fewstep.method import Method, Row
from fewstep.models import as_model
from fewstep.recipe import (check_loop_options, config_defaults, loop_options_from_args, loop_recipe,
                            method_config, take_config_options)
from fewstep.recipe import run_info as api_run_info
from fewstep.nets import FeatureTap, build_net, channels_last_copy, set_dropout
from fewstep.sampling import sample_shape
from fewstep.schedule import Schedule, index_subsequence
from fewstep.show import reference_levels, versus
from fewstep.solvers import STOCHASTIC, solve
from fewstep.train import (StepContext, TrainConfig, Trainer, TrainMethod, fresh_autocast, pick_device, run_record,
                           untimed)
from fewstep.viz import image_grid, pairs_picture, save_png

INITS = ("random", "teacher")
HIDDEN = ("l1", "kl", "none")
LOSSES = ("l1", "l2")
SAMPLERS = ("ddpm", "ddim")
INDEX_RULES = {"trailing": "round((s+1)*T/T') - 1", "leading": "s*floor(T/T')", "spread": "floor(s*T/T')"}
FALLBACK_ITERATIONS = 4000  # when the teacher's card does not say how long it trained
TEACHER_SAMPLES_FRACTION = 0.2  # the authors' demo trains the student on about a fifth of the teacher's samples
MAX_STEP_BINS = 16  # per-step ε errors: every step up to this T', equal bins of steps beyond


# ---- the student chain ----------------------------------------------------------------------------

def check_teacher(teacher: Denoiser, method: str = "SFDDM") -> None:
    """A distillable teacher: a discrete VP table, not step-conditioned."""
    if not teacher.schedule.is_discrete:
        raise FewstepError(f"{method} needs a discrete teacher table (T steps); this teacher is continuous: "
                           "use its table teacher.discrete_view() (SFDDM does so by itself)")
    if teacher.has_step_condition:
        raise FewstepError(f"{method}: the teacher is step-conditioned (an SFD-v student); distil a plain teacher")


def teacher_table(teacher: Denoiser) -> tuple[Denoiser, dict | None]:
    """The teacher SFDDM distils: itself when it has a table; a continuous (EDM, VE or VP-SDE) model
    through the discrete table read off it (schedule.continuous_table), with how it was made."""
    if teacher.schedule.is_discrete:
        return teacher, None
    return teacher.discrete_view()


def index_set(teacher: Denoiser, steps: int | None, index="trailing", allow_full: bool = False) -> torch.Tensor:
    """The teacher indices φ (long, strictly increasing) of a T'-step student.

    `index` is one of INDEX_RULES ('trailing', 'leading' = the authors' s·⌊T/T'⌋, 'spread' =
    ⌊s·T/T'⌋), a comma-separated string or a sequence of ints. With an explicit list `steps` may be
    None (T' = its length). allow_full admits T' = T (φ = 0..T-1), the identity student used to
    check invariants; users never get it.
    """
    check_teacher(teacher)
    T = teacher.schedule.T
    named = isinstance(index, str) and index in INDEX_RULES
    if named and steps is None:
        raise FewstepError(f"index set {index!r}: give the student's step count T' (--steps)")
    if steps is not None and steps < 1:
        raise FewstepError(f"student steps T'={steps}: expected T' >= 1")
    if named and not 1 <= steps <= (T if allow_full else T - 1):
        raise FewstepError(f"student steps T'={steps}: expected 1 <= T' < T = {T}")
    if index == "leading":  # the authors' code: the teacher index c·s with c = ⌊T/T'⌋
        return index_subsequence(T, steps, [s * (T // steps) for s in range(steps)], allow_full=allow_full)
    if index == "spread":  # schedule.index_subsequence's floor rule
        return index_subsequence(T, steps, "leading", allow_full=allow_full)
    if isinstance(index, str) and index not in INDEX_RULES:
        try:
            [int(v) for v in index.split(",") if v.strip()]
        except ValueError:
            raise FewstepError(f"index set {index!r}: expected {', '.join(INDEX_RULES)} or a comma-separated "
                               "list of increasing teacher indices") from None
    return index_subsequence(T, steps, index, allow_full=allow_full)


def default_iterations(teacher_card: dict | None, batch: int) -> tuple[int, str]:
    """Training iterations sized like the authors' schedule: the student sees about a fifth of the
    samples the teacher was trained on (its card's training iterations × batch). Returns
    (iterations, how they were derived); FALLBACK_ITERATIONS when the card does not say."""
    tr = (teacher_card or {}).get("training") or {}
    its, tb = tr.get("iterations"), tr.get("batch")
    if not (isinstance(its, int) and isinstance(tb, int) and its > 0 and tb > 0) or batch < 1:
        return FALLBACK_ITERATIONS, f"{FALLBACK_ITERATIONS} (the teacher's card does not record its training)"
    n = max(1, round(TEACHER_SAMPLES_FRACTION * its * tb / batch))
    return n, (f"{n} = a fifth of the teacher's {its} x {tb} training samples at batch {batch} "
               "(the authors' schedule)")


def student_chain(teacher_alpha_bar: torch.Tensor, phi: torch.Tensor) -> dict:
    """ᾱ', α', β' and the posterior variance β̃' of the student chain (float64, index 0 least noisy).

    ᾱ'_s = ᾱ[φ_s]; α'_0 = ᾱ'_0, α'_s = ᾱ'_s / ᾱ'_{s−1}; β' = 1 − α';
    β̃'_s = β'_s·(1 − ᾱ'_{s−1}) / (1 − ᾱ'_s) for s ≥ 1 and β̃'_0 = 0 (the last step has no noise).
    """
    ab = torch.as_tensor(teacher_alpha_bar, dtype=torch.float64)[phi.long()]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    alpha = ab / prev
    beta = 1 - alpha
    beta_tilde = beta * (1 - prev) / (1 - ab)
    return {"alpha_bar": ab, "alpha": alpha, "beta": beta, "beta_tilde": beta_tilde}


def kl_weight(student_alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-step weight w_s of KL(teacher kernel ‖ student kernel) = w_s·‖ε_T − ε_S‖².

    Both reverse kernels are N(μ(x_s, ε), σ_s² I) with μ = (x_s − β'_s/sqrt(1−ᾱ'_s)·ε)/sqrt(α'_s), so
    w_s = β'_s² / (2·σ_s²·α'_s·(1 − ᾱ'_s)). σ_s² is the posterior variance β̃'_s for s ≥ 1; at
    s = 0 the posterior variance is 0 (infinite weight), so there we use DDPM's other choice
    σ_0² = β'_0, which gives w_0 = 1 / (2·ᾱ'_0).
    """
    ab = torch.as_tensor(student_alpha_bar, dtype=torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    alpha = ab / prev
    beta = 1 - alpha
    var = beta * (1 - prev) / (1 - ab)
    var[0] = beta[0]
    return beta**2 / (2 * var * alpha * (1 - ab))


def make_student(teacher: Denoiser, phi: torch.Tensor, init: str = "random", seed: int = 0,
                 dropout: float | None = 0.0, table_name: str | None = None) -> Denoiser:
    """The student Denoiser: the teacher's architecture on the exact table ᾱ[φ].

    init='teacher' copies the teacher's weights and keeps the teacher's time input at φ_s (so the
    time embedding is reused); init='random' builds a fresh network (seeded) whose time input is
    its own index s, as in the authors' code. dropout: the student's rate (default 0, as the
    authors' network has none; None keeps the teacher's).
    """
    check_teacher(teacher)
    if init not in INITS:
        raise FewstepError(f"init {init!r}: expected one of {', '.join(INITS)}")
    phi = torch.as_tensor(phi, dtype=torch.long)
    if init == "teacher":
        net = copy.deepcopy(teacher.net)
        timesteps = teacher.schedule.timesteps[phi]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_net(teacher.net.config)
        timesteps = torch.arange(len(phi), dtype=torch.float64)
    net = net.to(next(teacher.net.parameters()).device)
    for p in net.parameters():
        p.requires_grad_(True)
    if dropout is not None:
        set_dropout(net, dropout)
    name = table_name or f"{teacher.schedule.table_name or 'custom'}[phi]"
    schedule = Schedule.discrete(teacher.schedule.alpha_bar[phi], timesteps=timesteps, table_name=name,
                                 derived_from=teacher.schedule.derived_from, sigma_data=teacher.schedule.sigma_data)
    return Denoiser(net, schedule, teacher.param, exact_table=True).take_components(teacher)


def raw_and_features(den: Denoiser, x: torch.Tensor, sigma, class_labels=None,
                     layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature hook: (raw network output, hidden feature map) of a Denoiser at (x, σ).

    The features are the network's own choice (its penultimate map, or the `feature_layer` of a
    foreign network's config), or the output of the sub-module named `layer`."""
    if layer is not None:
        with FeatureTap(den.net, layer) as tap:
            raw = den.raw(x, sigma, class_labels=class_labels)
        return raw, tap.value
    out = den.raw(x, sigma, class_labels=class_labels, return_features=True)
    if not isinstance(out, tuple) or len(out) != 2:
        raise FewstepError("the network does not return its penultimate features (return_features=True)")
    return out


def raw_to_eps(den: Denoiser, raw: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    if den.param == "eps":
        return raw
    return (x - den.raw_to_x0(raw, x, sigma)) / den._bcast(sigma, x)


def student_grid(student: Denoiser) -> torch.Tensor:
    """The student's own sampling grid: its table σ's, noisiest first, then 0 (NFE = T')."""
    return torch.cat([student.table_sigmas(), torch.zeros(1, dtype=torch.float64)])


def phi_grid(teacher: Denoiser, phi) -> torch.Tensor:
    """The teacher's σ at φ, noisiest first, then 0: the grid of its own T'-step chain on φ."""
    sig = teacher.schedule.sigmas[torch.as_tensor(phi, dtype=torch.long)].flip(0)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def teacher_on_phi(teacher_ckpt, phi, sampler: str = "ddpm", clip: float | None = 1.0):
    """SFDDM's ceiling: the teacher itself sampled on its T'-step chain at φ (DDPM ancestral or DDIM
    η = 0, x̂0 clipped like the student), as a Checkpoint that `sampling.sample` draws from. The
    SFDDM loss is minimised by copying the teacher at φ, so no student can beat this on average."""
    if sampler not in SAMPLERS:
        raise FewstepError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    table = teacher_table(teacher_ckpt.denoiser)[0]
    check_teacher(table)
    phi = index_subsequence(table.schedule.T, None, [int(v) for v in phi])
    card = {**teacher_ckpt.card, "sampler": {"name": sampler, "nfe": len(phi), "clip": clip,
                                             "sigmas": [float(v) for v in phi_grid(table, phi)]}}
    return Checkpoint(teacher_ckpt.denoiser, card, teacher_ckpt.path)


def step_bins(T_student: int) -> list[tuple[int, int]]:
    """Student steps grouped for the per-step ε error: each step alone up to MAX_STEP_BINS steps, else
    MAX_STEP_BINS equal runs of steps. Pairs (first, last) of student indices s (0 = least noisy)."""
    n = min(T_student, MAX_STEP_BINS)
    edges = [round(k * T_student / n) for k in range(n + 1)]
    return [(edges[k], edges[k + 1] - 1) for k in range(n)]


def check_resume_phi(out_dir, phi) -> None:
    """Refuse to resume a run whose saved student was made on another index set (e.g. one made when
    'leading' meant floor(s·T/T'), now 'spread')."""
    try:
        saved = (read_card(Path(out_dir)).get("method") or {}).get("phi")
    except FewstepError:
        return  # nothing saved yet
    now = [int(v) for v in phi]
    if saved is not None and [int(v) for v in saved] != now:
        raise FewstepError(f"--resume: the run in {out_dir} was made on phi={saved}, these settings give "
                           f"phi={now}. 'leading' now follows the authors' code (s*floor(T/T')); the earlier "
                           "rule floor(s*T/T') is --index spread, or pass the saved list with --index")


# ---- the method -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SFDDMConfig:
    """What an SFDDM run distils (its budget and optimizer are the loop's options, `SFDDM_LOOP`); checked when
    made, never changed by a run."""
    steps: int | None = None          # T'; None with an explicit index list
    index: object = "trailing"        # trailing | leading | "i,j,..." | list of ints
    init: str = "random"
    hidden: str = "l1"                # l1 on the penultimate map | kl (time-weighted ε-MSE) | none
    loss: str = "l1"                  # output term: l1 | l2
    lam: float = 1.0
    sampler: str = "ddpm"             # the card's default: ddpm ancestral | ddim (η = 0)
    clip: object = "auto"             # x̂0 clipping when sampling: a float, None, or auto (1 for images)
    dropout: float | None = 0.0       # the authors' student has none; None: the teacher's
    feature_layer: str | None = None  # sub-module whose output is the hidden variable (None: the net's default)
    seed: int = 0                     # random init
    allow_full: bool = False          # admit T' = T (invariant checks only)

    def __post_init__(self):
        if self.steps is not None:
            object.__setattr__(self, "steps", A.check("steps", self.steps, A.positive_int))
        self.validate()

    def validate(self):
        if self.init not in INITS:
            raise FewstepError(f"--init {self.init!r}: expected one of {', '.join(INITS)}")
        if self.hidden not in HIDDEN:
            raise FewstepError(f"--hidden {self.hidden!r}: expected one of {', '.join(HIDDEN)}")
        if self.loss not in LOSSES:
            raise FewstepError(f"--loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise FewstepError(f"--lam {self.lam}: expected a finite weight >= 0")
        if self.sampler not in SAMPLERS:
            raise FewstepError(f"--sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise FewstepError(f"--dropout {self.dropout}: expected a probability in [0, 1)")


class SFDDM(TrainMethod):
    """One fold: a T'-step student matches the teacher's outputs and hidden features at φ."""
    name = "sfddm"
    needs_data = True

    def __init__(self, teacher: Denoiser, cfg: SFDDMConfig, data_info: dict | None = None,
                 teacher_ref: dict | None = None):
        cfg.validate()
        # a continuous teacher is distilled on a table read off it, recorded on the student's card
        teacher, self.teacher_table = teacher_table(teacher)
        check_teacher(teacher)
        self.cfg = cfg
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.data_info = data_info or {}
        self.teacher_ref = teacher_ref
        self.phi = index_set(teacher, cfg.steps, cfg.index, allow_full=cfg.allow_full)
        self.student = make_student(teacher, self.phi, cfg.init, cfg.seed, cfg.dropout)
        self.kl_w = kl_weight(self.student.schedule.alpha_bar)
        self.shape = self._check_shape()
        self.iterations = 0
        self.samples_seen = 0
        # per-step ε error: a running mean per bin of student steps (decay 0.9 per iteration that saw the bin)
        self.bins = step_bins(self.T_student)
        self.bin_of = torch.tensor([k for k, (a, b) in enumerate(self.bins) for _ in range(a, b + 1)])
        self.eps_err = [None] * len(self.bins)
        if cfg.clip == "auto":
            self.clip = 1.0 if self.data_info.get("kind") == "image" else None
        else:
            self.clip = None if cfg.clip is None else float(cfg.clip)

    def _check_shape(self):
        teacher_shape = list(sample_shape({"net": self.teacher.net.config}))
        data_shape = trained_shape(self.data_info)
        if data_shape is not None and list(data_shape) != teacher_shape:
            hint = f"; pass --resolution {teacher_shape[-1]}" if len(teacher_shape) == 3 else ""
            raise FewstepError(f"data shape {list(data_shape)} does not match the teacher's sample shape "
                               f"{teacher_shape}{hint}")
        return teacher_shape

    @property
    def T_student(self) -> int:
        return len(self.phi)

    def trainable(self):
        return self.student

    # ---- loss ----------------------------------------------------------------------------------------
    def losses(self, x0: torch.Tensor, s: torch.Tensor, eps: torch.Tensor, student: Denoiser | None = None,
               autocast=None, class_labels=None, timed=None) -> tuple[torch.Tensor, dict]:
        """The SFDDM loss for data x0 (of classes `class_labels`, for a conditional teacher) at student
        steps s (long) with noise ε shared by both models. `timed(part)`: the training loop's profile."""
        timed = timed or untimed
        student = student or self.student
        class_labels = self.teacher.check_labels(class_labels, len(x0))
        if next(self.teacher.parameters()).device != x0.device:
            self.teacher.to(x0.device)
        sigma = student.schedule.sigmas[s.cpu()].to(x0.device)  # == teacher σ at φ_s, bit for bit
        x = x0 + student._bcast(sigma, x0) * eps                  # = x_vp / sqrt(ᾱ'_s), same for both
        ctx = autocast if autocast is not None else torch.autocast("cpu", enabled=False)
        self._last = (x, sigma, class_labels, autocast)
        with ctx:
            with torch.no_grad(), timed("teacher"):
                y_t, h_t = raw_and_features(self.teacher, x, sigma, class_labels, self.cfg.feature_layer)
            with timed("student"):
                y_s, h_s = raw_and_features(student, x, sigma, class_labels, self.cfg.feature_layer)
        y_t, h_t, y_s, h_s = y_t.float(), h_t.float(), y_s.float(), h_s.float()
        diff = y_s - y_t
        out_loss = diff.abs().mean() if self.cfg.loss == "l1" else diff.square().mean()
        logs = {"out_loss": float(out_loss.detach())}
        loss = out_loss
        e_t = raw_to_eps(self.teacher, y_t, x, sigma)
        e_s = raw_to_eps(student, y_s, x, sigma)
        eps_mse = (e_s - e_t).square().reshape(len(x), -1).mean(1)  # per sample: which steps are not learnt yet
        logs["eps_mse"] = eps_mse.detach()
        if self.cfg.hidden == "l1":
            hid = (h_s - h_t).abs().mean()
        elif self.cfg.hidden == "kl":
            # KL per dimension (sum over dimensions / D) so λ means the same at every resolution
            w = self.kl_w.to(x0.device)[s.to(x0.device)].float()
            hid = (w * eps_mse).mean()
        else:
            hid = None
        if hid is not None:
            logs["hidden_loss"] = float(hid.detach())
            loss = loss + self.cfg.lam * hid
        logs["loss"] = float(loss.detach())
        return loss, logs

    def train_step(self, ctx: StepContext, batch, gen):
        B = batch.shape[0]
        gb = B * ctx.world
        # steps and ε for the global batch, sliced: identical across process counts and on resume
        s = ctx.local(torch.randint(0, self.T_student, (gb,), generator=gen))
        eps = ctx.local(torch.randn((gb, *batch.shape[1:]), generator=gen)).to(batch.device)
        loss, logs = self.losses(batch, s, eps, autocast=ctx.autocast(), class_labels=ctx.labels, timed=ctx.timed)
        logs["grad_norm"] = ctx.step(loss)
        logs["eps_mse_by_step"] = self._track_eps(s, logs.pop("eps_mse"), ctx.world)
        self.iterations += 1
        self.samples_seen += gb
        return logs

    def use_channels_last(self):
        self.teacher = channels_last_copy(self.teacher)

    def floor_calls(self):
        """The last iteration's calls alone: one teacher forward with features (no grad), one student
        forward with features and its backward, on the iteration's batch."""
        last = getattr(self, "_last", None)
        if last is None:
            return None
        x, sigma, labels, autocast = last
        layer = self.cfg.feature_layer

        def teacher():
            with torch.no_grad(), fresh_autocast(autocast):
                raw_and_features(self.teacher, x, sigma, labels, layer)

        def student():
            with fresh_autocast(autocast):
                y, h = raw_and_features(self.student, x, sigma, labels, layer)
            (y.float().sum() + h.float().sum()).backward()
        return {"teacher": [teacher], "student": [student]}

    def _track_eps(self, s: torch.Tensor, eps_mse: torch.Tensor, world: int = 1) -> list:
        """Update the running per-bin ε error with one batch; returns the bins' current values
        (None for a bin not seen yet). Under DDP the per-bin sums are averaged over processes."""
        k = self.bin_of[s.cpu()]
        sums = torch.zeros(len(self.bins), dtype=torch.float64).index_add_(0, k, eps_mse.double().cpu())
        counts = torch.zeros(len(self.bins), dtype=torch.float64).index_add_(0, k, torch.ones(len(k), dtype=torch.float64))
        if world > 1:
            both = torch.cat([sums, counts]).to(eps_mse.device)
            dist.all_reduce(both)
            sums, counts = both.cpu()[:len(self.bins)], both.cpu()[len(self.bins):]
        for b in range(len(self.bins)):
            if counts[b] > 0:
                m = float(sums[b] / counts[b])
                self.eps_err[b] = m if self.eps_err[b] is None else 0.9 * self.eps_err[b] + 0.1 * m
        return [None if v is None else round(v, 6) for v in self.eps_err]

    def eps_error_summary(self) -> str | None:
        """One line for people: the running ε MSE (student vs teacher) per student step or bin of steps
        (s = 0 is the least noisy, the last sampling step) and where it is largest."""
        seen = [(v, k) for k, v in enumerate(self.eps_err) if v is not None]
        if not seen:
            return None
        name = [f"s{a}" if a == b else f"s{a}-{b}" for a, b in self.bins]
        cells = " ".join(f"{n}={'-' if v is None else f'{v:.2g}'}" for n, v in zip(name, self.eps_err))
        return f"eps MSE vs teacher by student step (s0 least noisy): {cells}; largest at {name[max(seen)[1]]}"

    def state_dict(self):
        return {"iterations": self.iterations, "samples_seen": self.samples_seen,
                "phi": [int(v) for v in self.phi], "eps_err": list(self.eps_err)}

    def load_state_dict(self, state):
        saved_phi = state.get("phi")
        if saved_phi is not None and [int(v) for v in saved_phi] != [int(v) for v in self.phi]:
            raise FewstepError(f"--resume: the saved run was made on phi={saved_phi}, these settings give "
                               f"phi={[int(v) for v in self.phi]}")
        self.iterations = int(state.get("iterations", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        eps_err = state.get("eps_err")
        if eps_err is not None and len(eps_err) == len(self.bins):
            self.eps_err = list(eps_err)

    # ---- card / preview -----------------------------------------------------------------------------
    def sampler_card(self) -> dict:
        return {"name": self.cfg.sampler, "nfe": self.T_student,
                "sigmas": [float(v) for v in student_grid(self.student)], "clip": self.clip}

    def card(self) -> dict:
        cfg = self.cfg
        index = cfg.index if isinstance(cfg.index, str) and cfg.index in INDEX_RULES else "list"
        n_data = self.data_info.get("n")
        method = {"name": "sfddm", "student_steps": self.T_student, "teacher_steps": self.teacher.schedule.T,
                  "index": index, "phi": [int(v) for v in self.phi], "init": cfg.init,
                  "time_input": "teacher index phi_s" if cfg.init == "teacher" else "student index s",
                  "loss": cfg.loss, "hidden": cfg.hidden, "lam": cfg.lam, "dropout": cfg.dropout,
                  "feature_layer": cfg.feature_layer or self.teacher.net.config.get("feature_layer", "penultimate"),
                  "init_seed": cfg.seed, "iterations": self.iterations,
                  "eps_mse_bins": [[a, b] for a, b in self.bins],
                  "eps_mse_by_step": [None if v is None else round(v, 6) for v in self.eps_err]}
        if index in INDEX_RULES:
            method["index_rule"] = INDEX_RULES[index]
        if self.teacher_table is not None:
            method["teacher_table"] = self.teacher_table
        if cfg.hidden == "kl":
            method["kl_sigma0"] = "beta'_0 (posterior variance is 0 at the last step)"
        if n_data:
            method["data_samples"] = int(n_data)
            method["epochs"] = round(self.samples_seen / int(n_data), 3)
        return {"method": method, "sampler": self.sampler_card(), "teacher": self.teacher_ref,
                "data": self.data_info}

    def preview(self, model, n, seed):
        dev = next(model.parameters()).device
        grid = student_grid(model).to(dev)
        x = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed)).to(dev) * float(grid[0])
        gen = torch.Generator(device=dev).manual_seed(seed + 1)
        labels = torch.arange(n, device=dev) % model.num_classes if model.num_classes else None
        return solve(self.cfg.sampler, model.with_step(None, labels), x, grid,
                     generator=gen if self.cfg.sampler in STOCHASTIC else None, clip=self.clip).x


# ---- the bench: SFDDM students, the teacher's own chain on phi (the ceiling), DDIM on the trailing steps ----

PANEL = "SFDDM and progressive distillation"


@dataclass
class SFDDMRow(Row):
    """An SFDDM student at T' = nfe with one index/init variant; `long`: the run of a fraction of the teacher's
    training iterations, scored at more points along the way."""

    variant: str = "trailing/random"
    long: bool = False

    def budget(self, bench) -> dict:
        s = bench.spec
        if self.long:
            return {"iterations": long_iterations(bench), "batch": s.sfddm_batch, "lr": s.sfddm_lr}
        iters = s.sfddm_iters if s.sfddm_iters is not None else default_iterations(bench.teacher_card, s.sfddm_batch)[0]
        return {"iterations": iters, "batch": s.sfddm_batch, "lr": s.sfddm_lr}

    def ensure_model(self, bench):
        path, budget = bench.model_dir(self.model), self.budget(bench)
        if bench.finished(path, budget):
            return path
        s = bench.spec
        index, init = self.variant.split("/")
        ds = bench.data()
        info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape)}
        method = SFDDM(bench.teacher.denoiser, SFDDMConfig(steps=self.nfe, index=index, init=init, seed=s.seed),
                       data_info=info, teacher_ref=teacher_reference(bench.teacher.path))
        bench.train(method, path, budget, data=ds.x,  # the authors clip no gradients
                    curve_points=s.sfddm_long_curve_points if self.long else None)
        return path


@dataclass
class CeilingRow(Row):
    """The teacher's own T'-step chain on phi (DDPM ancestral or DDIM): the best an SFDDM student can score,
    whose loss is minimised by copying the teacher there. Discrete teachers only."""

    sampler: str = "ddpm"
    index: str = "trailing"

    def sampling(self, bench) -> tuple:
        phi = index_set(bench.teacher.denoiser, self.nfe, self.index)
        return teacher_on_phi(bench.teacher, phi, self.sampler, None if bench.is_toy else 1.0), {}, None


@dataclass
class TrailingDDIMRow(Row):
    """DDIM on the teacher's own steps at T' trailing points: the training-free row beside an SFDDM T'."""

    sampler: str = "ddim"
    trailing: bool = True

    def sampling(self, bench) -> tuple:
        return bench.teacher, {"nfe": self.nfe, "sampler": "ddim", "grid": "discrete"}, None


def long_iterations(bench) -> int:
    """The long SFDDM run's length: its fraction of the iterations the teacher's card says it trained."""
    done = (bench.teacher_card.get("training") or {}).get("iterations")
    if not done:
        raise FewstepError(f"sfddm_long_fraction: the teacher {bench.spec.teacher} has no training iterations "
                           "on its card to take a fraction of")
    return max(1, round(bench.spec.sfddm_long_fraction * int(done)))


def ceiling_rows(bench, T: int, indices: list) -> list[CeilingRow]:
    """The teacher on its own T'-step chain at each index set (DDPM ancestral and DDIM); progressive
    distillation's grids are the trailing phi. None for a continuous teacher."""
    if not bench.teacher.denoiser.schedule.is_discrete:
        return []
    return [CeilingRow(f"teacher-on-phi-{T}-{index}-{name}", "teacher-on-phi", T,
                       f"teacher on phi (ceiling) ({index}, {name})", panel=None, sampler=name, index=index)
            for index in dict.fromkeys(indices) for name in ("ddpm", "ddim")]


def bench_rows(bench) -> list[Row]:
    s, rows = bench.spec, []
    for T in s.sfddm_steps:
        every = s.sfddm_variants_at is None or T in s.sfddm_variants_at
        variants = s.sfddm_variants if every else s.sfddm_variants[:1]
        if "sfddm" in s.methods:
            for variant in variants:
                index, init = variant.split("/")
                rows.append(SFDDMRow(f"sfddm-{T}-{index}-{init}", "sfddm", T, f"SFDDM ({variant})",
                                     model=f"sfddm-{T}-{index}-{init}", panel=PANEL, variant=variant))
        if "ddim" in s.methods and "sfddm" in s.methods and bench.teacher.denoiser.schedule.is_discrete and T not in s.nfe:
            rows.append(TrailingDDIMRow(f"ddim-trailing-{T}", "ddim", T, "DDIM (trailing steps)"))
        if "sfddm" in s.methods:
            rows += ceiling_rows(bench, T, [v.split("/")[0] for v in variants])
    if "sfddm" in s.methods and s.sfddm_long_fraction:
        # does longer training close the gap to the teacher's own chain on phi? (that row is the ceiling)
        T, variant = s.sfddm_steps[0], s.sfddm_variants[0]
        index, init = variant.split("/")
        key = f"sfddm-{T}-{index}-{init}-long"
        rows.append(SFDDMRow(key, "sfddm", T, f"SFDDM ({variant}, long run)", model=key, panel=PANEL, variant=variant,
                             long=True))
    return rows


def bench_extras(bench, summary: dict, figdir: Path) -> dict:
    """Semantic consistency (the teacher and the best SFDDM student at the smallest T' on the same noises, each
    with its default deterministic sampler) and interpolation strips (slerp and linear) of that student."""
    rows = [r for r in summary["rows"] if r["method"] == "sfddm"]
    if not rows:
        return {}
    r = min(rows, key=lambda r: (r["nfe"], r["quality"][summary["quality_key"]]["mean"]))
    student = load_checkpoint(bench.model_dir(r["model"]), device=bench.device)
    n = 256
    xa, xb, st = compare_models(bench.teacher, student, n=n, seed=0)
    pairs_picture(xa[:32], xb[:32], figdir / "sfddm-consistency.png", "teacher", r["key"])
    out = {"model": r["key"], "n": n, "teacher_sampler": f"{st['a']['sampler']} NFE {st['a']['nfe']}",
           "student_sampler": f"{st['b']['sampler']} NFE {st['b']['nfe']}",
           **{k: v for k, v in st.items() if k.startswith(("psnr", "mse"))}}
    if not bench.is_toy:
        strips = [sample_same_noise(student, interpolation_noises(bench.shape, (3, 7), 9, mode))[0]
                  for mode in ("slerp", "linear")]
        save_png(image_grid(torch.cat(strips), nrow=9), figdir / "sfddm-interpolation.png")
    out["figures"] = ["sfddm-consistency.png"] + ([] if bench.is_toy else ["sfddm-interpolation.png"])
    return {"consistency": out}


# ---- the report -----------------------------------------------------------------------------------------

def ceilings(rows: list, key: str, nfe: int, index: str) -> dict:
    """{sampler: quality} of the teacher's own nfe-step chain on the index set (the ceiling rows)."""
    return {x["sampler"]: x["quality"][key]["mean"] for x in rows
            if x["method"] == "teacher-on-phi" and x["nfe"] == nfe and x["index"] == index}


def ceiling_line(r: dict, rows: list, key: str, index: str) -> str | None:
    """A student row next to the teacher's own chain on the same phi."""
    ceil = ceilings(rows, key, r["nfe"], index)
    if not ceil:
        return None
    return (f"- {r['label']}, NFE {r['nfe']}: {key.upper()} {r['quality'][key]['mean']:.3g}; the teacher's own "
            f"{r['nfe']}-step chain on the same phi scores " +
            ", ".join(f"{n.upper()} {v:.3g}" for n, v in sorted(ceil.items())) + ".")


def long_run_reading(r: dict, rows: list, key: str) -> str:
    """Whether SFDDM's quality keeps improving with training toward the teacher's own chain on phi."""
    K = key.upper()
    curve = r["cost_curve"]
    first, last = curve[0], curve[-1]
    ceil = ceilings(rows, key, r["nfe"], r["variant"].split("/")[0])
    text = (f"- {r['label']}, NFE {r['nfe']}: {K} along the run (first sample seed) "
            + ", ".join(f"{p['quality'][key]:.3g} at iteration {p['step']}" for p in curve) + ".")
    best = ceil.get("ddpm", min(ceil.values())) if ceil else None
    if best is not None:
        gap0, gap1 = first["quality"][key] - best, last["quality"][key] - best
        text += (f" The gap to the teacher's own {r['nfe']}-step chain on phi ({'DDPM' if 'ddpm' in ceil else 'DDIM'} "
                 f"{best:.3g}) went from {gap0:.3g} to {gap1:.3g}"
                 + (f" ({100 * (1 - gap1 / gap0):.0f} % of it closed)." if gap0 > 0 else "."))
    return text


def reading(summary: dict) -> list[str]:
    key, K = summary["quality_key"], summary["quality_key"].upper()
    rows = [r for r in summary["rows"] if not r.get("apart")]
    teacher, floor = reference_levels(rows, key)
    sfddm = [r for r in rows if r["method"] == "sfddm"]
    lines = []
    if teacher is not None:
        rq = teacher["quality"][key]["mean"]
        for r in sfddm:
            if r["nfe"] == min(x["nfe"] for x in sfddm):
                q = r["quality"][key]["mean"]
                ddim = next((x for x in rows if x["method"] == "ddim" and x["nfe"] == r["nfe"]), None)
                msg = (f"- {r['label']}, T'={r['nfe']}: {K} {versus(q, rq, floor)} "
                       f"(target ≤ 1.5×: {'met' if q <= 1.5 * rq else 'not met'})")
                if ddim:
                    dq = ddim["quality"][key]["mean"]
                    msg += f"; teacher DDIM-{r['nfe']} {dq:.3g} ({'beaten' if q < dq else 'not beaten'})"
                lines.append(msg + ".")
    for r in sfddm:  # the SFDDM objective is minimised by copying the teacher at phi: its chain there is the ceiling
        line = ceiling_line(r, rows, key, r["variant"].split("/")[0])
        if line:
            lines.append(line)
    lines += [long_run_reading(r, rows, key) for r in sfddm if r.get("long") and r.get("cost_curve")]
    c = summary.get("consistency")
    if c:
        lines.append(f"- Semantic consistency ({c['model']} with {c['student_sampler']} against the teacher with "
                     f"{c['teacher_sampler']}, {c['n']} shared noises): PSNR of matched pairs {c['psnr_matched']:.2f} "
                     f"dB vs shuffled pairs {c['psnr_shuffled']:.2f} dB (higher matched PSNR = the same noise gives "
                     "the same sample). The interpolation figure shows slerp (top row) and linear (bottom row) "
                     "between seeds 3 and 7.")
    return lines


# ---- the run: one call for Python and the command line -----------------------------------------------

# the authors train without gradient clipping or EMA; iterations: a fifth of the teacher's samples (default_iterations)
SFDDM_LOOP = loop_recipe(iters=None, batch=64, lr=2e-4, grad_clip=0.0, ema=None)


def distill_sfddm(teacher, data, out, config: SFDDMConfig | None = None, *, resolution: int | None = None,
                  data_seed: int | None = None, resume: bool = False, run_info: dict | None = None,
                  **options) -> Checkpoint:
    """Distil a discrete teacher (a loaded model, a built-in name or a checkpoint folder) into a T'-step SFDDM
    student trained on `data` (what the teacher was trained on), in the folder `out`; returns the student.

    SFDDM's options come as `config` (an `SFDDMConfig`) or as keywords: `steps` (T', the student's NFE),
    `index` (trailing, leading, spread or a list of teacher indices), `init` (random or teacher), `hidden`,
    `loss`, `lam`, `sampler`, `clip`, `dropout`, `feature_layer`. Training-loop keywords
    (`fewstep.recipe.LOOP_OPTIONS`) default to the authors' schedule: a fifth of the teacher's training samples
    (its card's iterations x batch / 5 / batch), batch 64, Adam 2e-4, no clipping, no EMA. `resolution` and
    `data_seed` default to the teacher's."""
    given = take_config_options(SFDDMConfig, options, exclude=("seed",))
    loop = check_loop_options(options, "distill_sfddm")
    resolved = {**SFDDM_LOOP, **loop}
    config = method_config(SFDDMConfig, config, given, "distill_sfddm", seed=resolved["seed"])
    resolution = None if resolution is None else A.check("resolution", resolution, A.resolution)
    data_seed = None if data_seed is None else A.check("data_seed", data_seed, A.seed)
    teacher = as_model(teacher, device=pick_device(resolved["device"]), what="teacher")
    if resolved["iters"] is None:
        resolved["iters"], how = default_iterations(teacher.card, resolved["batch"])
        print(f"training iterations: {how}")
    if run_info is None:
        run_info = api_run_info("distill_sfddm", {"teacher": teacher, "data": data, "out": str(out),
                                                  "resolution": resolution, "data_seed": data_seed,
                                                  **{k: v for k, v in asdict(config).items() if k != "seed"}, **loop})
    ds, info = distill_data(data, resolution, data_seed, teacher)
    method = SFDDM(teacher.denoiser, config, info, teacher_ref=teacher_reference(teacher.path))
    if resume:
        check_resume_phi(out, method.phi)
    Trainer(method, TrainConfig.from_options(resolved), out, data=ds.x, resume=resume, run_info=run_info,
            labels=distill_labels(teacher, ds)).run()
    student = load_checkpoint(out, device=next(teacher.denoiser.parameters()).device)
    student.extra["eps_error_summary"] = method.eps_error_summary()
    return student


# ---- the command line ---------------------------------------------------------------------------------

def add_arguments(p, add_loop_options):
    D = config_defaults(SFDDMConfig)
    p.add_argument("--teacher", required=True, help="discrete VP teacher checkpoint or built-in name")
    p.add_argument("--data", required=True, help="training data the teacher was trained on (built-in name or path)")
    p.add_argument("--resolution", type=A.resolution, default=None, help="image size (default: the teacher's)")
    p.add_argument("--data-seed", type=A.seed, default=None, help="train/held-out split seed (default: the teacher's)")
    add_loop_options(SFDDM_LOOP, notes={
        "iters": "default: the authors' schedule, a fifth of the teacher's training samples: its card's "
                 f"iterations x batch / 5 / --batch; {FALLBACK_ITERATIONS} if the card does not say",
        "grad_clip": "default 0: none, as the authors; the other commands clip at 1",
        "ema": "e.g. 0.999, our deviation: the authors use none; default none"})
    # --steps is the student's step count here (as in the paper's T'); iterations move to --iters
    p.add_argument("--steps", type=A.positive_int, default=D["steps"],
                   help="student steps T' (= NFE); may be left out with an explicit --index list")
    p.add_argument("--index", default=D["index"],
                   help="index set phi: trailing (default; round((s+1)T/T')-1, the student's noisiest step is the "
                        "teacher's), leading (the authors' code: s*floor(T/T'), ends short of the noisiest step), "
                        "spread (floor(s*T/T'), fewstep's 'leading' before), or increasing teacher indices i,j,...")
    p.add_argument("--init", default=D["init"], choices=INITS,
                   help="student weights: random (authors' choice; time input = own index s) or a copy of "
                        "the teacher (time input = phi_s). With 'teacher' the loss starts at exactly 0")
    p.add_argument("--hidden", default=D["hidden"], choices=HIDDEN,
                   help="hidden-variable term: l1 on the penultimate feature map (default), kl (closed-form "
                        "KL of the reverse kernels, a time-weighted eps-MSE) or none")
    p.add_argument("--loss", default=D["loss"], choices=LOSSES, help=f"output term (default {D['loss']})")
    p.add_argument("--lam", type=A.non_negative, default=D["lam"],
                   help=f"weight of the hidden term (default {D['lam']:g})")
    p.add_argument("--feature-layer", default=D["feature_layer"],
                   help="sub-module whose output is the hidden variable, e.g. up.3 (default: the network's "
                        "penultimate map; for imported networks the layer recorded at import)")
    p.add_argument("--sampler", default=D["sampler"], choices=SAMPLERS,
                   help="the student's default sampler: ddpm ancestral (default) or ddim eta=0")
    p.add_argument("--clip", type=A.clip_bound, default=D["clip"],
                   help="x0 clipping when sampling: a bound, or 'none' (default: 1 for images, none for 2-D)")
    p.add_argument("--dropout", type=A.probability, default=D["dropout"],
                   help="student dropout rate (default 0: the authors' network has none, and a teacher-initialised "
                        "student then starts at exactly zero loss)")


def run(args):
    # the config's seed is the loop's (--seed)
    config = SFDDMConfig(**take_config_options(SFDDMConfig, dict(vars(args)), exclude=("seed",)), seed=args.seed)
    student = distill_sfddm(args.teacher, args.data, args.out, config, resolution=args.resolution,
                            data_seed=args.data_seed, resume=args.resume, run_info=run_record(args),
                            **loop_options_from_args(args))
    phi = student.card["method"]["phi"]
    shown = phi if len(phi) <= 12 else phi[:5] + ["..."] + phi[-5:]
    print(f"SFDDM student (T'={len(phi)} of T={student.card['method']['teacher_steps']}, phi={shown}) saved to "
          f"{args.out} (sample it with: fewstep sample {args.out}; NFE {len(phi)})")
    if student.extra["eps_error_summary"]:
        print(student.extra["eps_error_summary"])


METHOD = Method(add_arguments=add_arguments, run=run, bench_methods=("sfddm",), bench_rows=bench_rows,
                bench_extras=bench_extras, reading=reading, parser_options=dict(
    conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Distil a discrete T-step teacher into a T'-step diffusion model in one fold. The student's\n"
                "chain is the teacher's read at an index set phi; it samples with its own T' steps (NFE = T').\n"
                "Note: here --steps is the student's step count T'; training iterations are --iters.",
    epilog="examples:\n"
           "  fewstep distill sfddm --teacher digits-teacher --data digits --steps 10 --out runs/sfddm10\n"
           "  fewstep distill sfddm --teacher T --data D --index 0,99,511,1023 --out runs/sfddm4"))
