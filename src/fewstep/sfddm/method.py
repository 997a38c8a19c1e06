"""SFDDM — Single-fold Distillation (Hong et al., ECML PKDD 2025): the method on fewstep's training loop, and
`distill_sfddm`, the one call the command line and `import fewstep` share.

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

from dataclasses import asdict

import torch
import torch.distributed as dist

from fewstep import argtypes as A
from fewstep.checkpoint import Checkpoint, load_checkpoint, teacher_reference
from fewstep.denoiser import Denoiser
from fewstep.devices import pick_device
from fewstep.distill.common import check_trained_shape, distill_data, distill_labels
from fewstep.distill.step_table import INDEX_RULES, check_teacher, index_set, teacher_table
from fewstep.errors import FewstepError, option
from fewstep.models import as_model
from fewstep.nets import channels_last_copy
from fewstep.recipe import check_loop_options, method_config, take_config_options
from fewstep.recipe import run_info as api_run_info
from fewstep.sampling import sample_shape
from fewstep.sfddm.chain import (check_resume_phi, kl_weight, make_student, raw_and_features, raw_to_eps, step_bins,
                                 student_grid)
from fewstep.sfddm.config import SFDDMConfig
from fewstep.sfddm.recipe import SFDDM_LOOP, default_iterations
from fewstep.solvers import STOCHASTIC, solve
from fewstep.timing import fresh_autocast, untimed
from fewstep.train import StepContext, TrainConfig, Trainer, TrainMethod


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
        check_trained_shape(self.data_info, teacher_shape)
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
        last = self._last
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
            raise FewstepError(f"{option('resume')}: the saved run was made on phi={saved_phi}, these settings give "
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
