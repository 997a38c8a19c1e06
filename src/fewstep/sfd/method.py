"""SFD — Simple and Fast Distillation (Zhou et al., NeurIPS 2024): the method on fewstep's training loop, and
`distill_sfd`, the one call the command line and `import fewstep` share.

Data-free trajectory distillation: the student (a copy of the teacher network, all weights tuned) learns to land,
with one plain Euler step per student timestamp, where a strong teacher solver lands (the objective:
fewstep.sfd.loss; the teacher's states: fewstep.sfd.trajectory). Modes:
  * SFD: one NFE; AFS (the analytical first step) saves its first network call.
  * SFD-v: one step-conditioned model for a set of NFEs; N is drawn per iteration.
  * the 1-NFE stage: a first-stage student sampled with Euler on its own grid is the teacher of a 1-NFE student
    (AFS + one step), with a perceptual term on the last step where one is available.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch

from fewstep import argtypes as A
from fewstep.checkpoint import Checkpoint, load_checkpoint, teacher_reference
from fewstep.components import default_prompts
from fewstep.denoiser import Denoiser
from fewstep.devices import pick_device
from fewstep.distill.trajectory_cache import TrajectoryCache
from fewstep.errors import FewstepError, options
from fewstep.lora import TeacherView, add_lora, lora_spec, remove_lora
from fewstep.models import as_model
from fewstep.nets import channels_last_copy, set_dropout
from fewstep.recipe import check_loop_options, method_config, take_config_options
from fewstep.recipe import run_info as api_run_info
from fewstep.sampling import sample_shape
from fewstep.schedule import check_nested
from fewstep.sfd.config import SFDConfig
from fewstep.sfd.loss import match_trajectory, trajectory_loss
from fewstep.sfd.recipe import SFD_LOOP, iterations_for, recipe
from fewstep.sfd.trajectory import TeacherTrajectory, sfd_grids, stage2_setup, teacher_evaluations
from fewstep.solvers import solve
from fewstep.train import StepContext, TrainConfig, Trainer, TrainMethod


class LastBatch(NamedTuple):
    """The last iteration's inputs, kept so the profiler can replay its network calls alone (`floor_calls`)."""
    ctx: StepContext
    x: torch.Tensor
    s_grid: torch.Tensor
    t_grid: torch.Tensor
    teacher_nfe: int
    labels: torch.Tensor | None
    text: object
    student_text: object


class SFD(TrainMethod):
    """SFD, SFD-v and the 1-NFE stage on the shared loop: the modes differ in their grids and teacher (set up
    here), and share the objective (fewstep.sfd.loss)."""
    needs_data = False

    def __init__(self, teacher: Checkpoint, cfg: SFDConfig, teacher_ref: dict | None = None,
                 trajectory_cache: str | Path | None = None, prompts: list[str] | None = None,
                 negative_prompt: str | None = None, guidance: float | None = None):
        self.cfg = cfg  # replaced below by the resolved copy (perceptual term, the 1-NFE stage's NFE)
        # teacher trajectories stored and reused by content (see fewstep.distill.trajectory_cache)
        self.cache = TrajectoryCache(trajectory_cache) if trajectory_cache is not None else None
        self.teacher = teacher
        self.teacher_ref = teacher_ref
        tden = teacher.denoiser.eval()
        for p in tden.parameters():
            p.requires_grad_(False)
        # a LoRA student is the teacher's own network with an adapter; the teacher is that network with it off
        self.lora, lora_student = None, None
        if cfg.lora is not None:
            self.lora = lora_spec(cfg.lora, cfg.lora_alpha, cfg.lora_targets)
            with torch.random.fork_rng(devices=[]):  # the adapter's A matrices, independent of RNG history
                torch.manual_seed(0)
                add_lora(tden.net, self.lora)
            lora_student = Denoiser(tden.net, tden.schedule, tden.param, tden.exact_table).take_components(tden)
            tden = Denoiser(TeacherView(tden.net), tden.schedule, tden.param, tden.exact_table).take_components(tden)
        self.shape = tuple(sample_shape(teacher.card))
        self.clip = 1.0 if cfg.thresholding else None
        self._loss, self.cfg = trajectory_loss(cfg, self.shape, teacher.card.get("data") or {},
                                               next(tden.parameters()).device)
        if cfg.stage2:
            self.name = "sfd-stage2"
            self.cfg = replace(self.cfg, nfe=[1], afs=True)
            self.grids, self.traj, self.student_step_cond, self.stage2_teacher_nfe = stage2_setup(teacher, self.cfg)
        else:
            self.name = "sfd-v" if len(cfg.nfe) > 1 else "sfd"
            self.grids = {n: sfd_grids(tden, cfg, n) for n in cfg.nfe}
            self.traj = TeacherTrajectory(tden, cfg.teacher_solver, clip=self.clip,
                                          final_orders=cfg.teacher_final_orders)
            self.student_step_cond = None  # per-iteration N for SFD-v
        self.traj.cache = self.cache
        self.student = copy.deepcopy(tden) if lora_student is None else lora_student
        if len(cfg.nfe) > 1 and not cfg.stage2:
            # a fixed seed makes the new layers' (non-zero) weights independent of RNG history
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.student.net.add_step_condition(cfg.step_condition)
        if lora_student is None:
            self.student.requires_grad_(True)
        elif self.student.net.step_cond is not None:  # the adapter and an SFD-v step condition train, nothing else
            self.student.net.step_cond.requires_grad_(True)
        if cfg.dropout is not None:
            set_dropout(self.student, cfg.dropout)
        self.positions = {n: check_nested(s, t) for n, (s, t) in self.grids.items()}
        self.trajectories = 0
        self._init_text(prompts, negative_prompt, guidance)

    def _init_text(self, prompts, negative_prompt, guidance):
        """A text teacher: trajectories of the guided teacher on prompts drawn uniformly from a list (the given
        one, else fewstep's shipped list), as the authors distil Stable Diffusion at a fixed guidance scale; the
        student takes the prompt alone (guidance 1) and its card keeps the scale it learnt."""
        tden = self.traj.den
        self.prompts = None
        if tden.text is None:
            if prompts or negative_prompt is not None or guidance is not None:
                raise FewstepError(f"{options('prompts', 'negative_prompt', 'guidance')}: the teacher is not "
                                   "text-conditioned")
            return
        self.prompts = list(prompts) if prompts else default_prompts()
        self.negative_prompt = tden.negative_prompt if negative_prompt is None else negative_prompt
        # the teacher's guidance for this run: given, or its card's (the teacher model itself is left as it is)
        self.guidance = tden.guidance if guidance is None else float(guidance)
        self.distilled_guidance = (self.teacher.card.get("text") or {}).get("distilled_guidance", self.guidance) \
            if self.cfg.stage2 else self.guidance
        # a guidance-distilled teacher (Flux) takes its scale as an input: its student takes the same input
        self.embedded_guidance = bool(getattr(tden.text, "embedded_guidance", False))
        self.student.guidance = self.guidance if self.embedded_guidance else 1.0

    def _batch_prompts(self, index: torch.Tensor):
        """This batch's prompts, encoded once: the teacher's conditioning (guided) and the student's (the same
        prompts alone, guidance 1; or, for a guidance-distilled teacher, the same scale as an input)."""
        text = self.traj.den.encode_prompts([self.prompts[i] for i in index.tolist()], self.negative_prompt,
                                            self.guidance)
        return text, text if self.embedded_guidance else text.with_guidance(1.0)

    @property
    def perceptual_net(self):
        """The last step's perceptual distance (None: none)."""
        return self._loss.perceptual_net

    @property
    def precision_check(self) -> dict | None:
        return self.traj.precision_check

    # ---- TrainMethod hooks -------------------------------------------------------------------
    def trainable(self):
        return self.student

    def _student_model(self, n_timestamps: int, class_labels=None, text=None):
        step = (self.student_step_cond or n_timestamps) if self.student.has_step_condition else None
        return self.student.with_step(step, class_labels, text)

    def _labels(self, ctx: StepContext, B: int, gen: torch.Generator):
        """(labels, the teacher's text conditioning, the student's). Class labels of a conditional teacher's
        trajectories: uniform over its classes (as the SFD code does), drawn for the global batch and sliced. A
        text teacher's prompts are drawn the same way from the prompt list; the batch's are encoded and its
        labels index them."""
        if self.prompts is not None:
            text, student_text = self._batch_prompts(torch.randint(len(self.prompts), (B,), generator=gen))
            return ctx.local(torch.arange(B)).to(ctx.device), text, student_text
        k = self.teacher.denoiser.num_classes
        return (ctx.local(torch.randint(k, (B,), generator=gen)).to(ctx.device) if k else None), None, None

    def train_step(self, ctx: StepContext, batch, gen: torch.Generator) -> dict:
        cfg = self.cfg
        B = ctx.world * self._local_batch(ctx)
        eps = ctx.local(torch.randn((B, *self.shape), generator=gen)).to(ctx.device)
        labels, text, student_text = self._labels(ctx, B, gen)
        # N is drawn from the iteration's global generator, so all processes pick the same N; after the
        # noise, so SFD-v's iteration k starts where an SFD run at that N does (shared cached trajectories)
        nfe = cfg.nfe[int(torch.randint(len(cfg.nfe), (1,), generator=gen))] if len(cfg.nfe) > 1 else cfg.nfe[0]
        s_grid, t_grid = self.grids[nfe]
        x = eps * float(s_grid[0])

        with ctx.timed("teacher"), ctx.autocast():
            if cfg.teacher_precision == "bf16" and self.precision_check is None:
                self.traj.check_precision(x, t_grid, self.positions[nfe], labels, nfe, cfg.teacher_precision_tol,
                                          text)
            targets, teacher_nfe, cached = self.traj.states(x, t_grid, self.positions[nfe], labels, text)
        # the floor replays the teacher calls the iteration made: none when it read its trajectories
        self._last = LastBatch(ctx, x, s_grid, t_grid, 0 if cached else teacher_nfe, labels, text, student_text)
        model = self._student_model(len(s_grid), labels, student_text)
        losses = match_trajectory(model, x, s_grid.to(ctx.device), targets, cfg.afs, self._loss, ctx)
        self.trajectories += B
        logs = {"loss": sum(losses) / len(losses), "nfe": nfe, "teacher_nfe": teacher_nfe,
                "trajectories": self.trajectories}
        if self.cache is not None:
            logs["teacher_cached"] = int(cached)
        logs.update({f"loss_step{i}": v for i, v in enumerate(losses)})
        return logs

    def use_channels_last(self):
        self.traj.den = channels_last_copy(self.traj.den)

    def floor_calls(self):
        """The last iteration's calls alone: the teacher at each of its evaluations on the iteration's
        batch (no grad), the student's forward and backward at each network-using student step."""
        last = self._last
        if last is None:
            return None
        ctx, x, s_grid, t_grid, teacher_nfe, labels, text, student_text = last
        tmodel = self.traj.den.with_step(self.traj.step, labels, text)
        sigmas = t_grid.to(x.device)
        model = self._student_model(len(s_grid), labels, student_text)

        def teacher_call(sigma):
            def call():
                with torch.no_grad(), ctx.autocast(), self.traj.autocast(x.device.type):
                    tmodel(x, sigma)
            return call

        def student_call(sigma):
            def call():
                with ctx.autocast():
                    out = model(x, sigma)
                out.float().sum().backward()
            return call

        first = 1 if self.cfg.afs else 0
        return {"teacher": [teacher_call(sigmas[min(k, len(sigmas) - 2)]) for k in range(teacher_nfe)],
                "student": [student_call(s_grid[i].to(x.device)) for i in range(first, len(s_grid) - 1)]}

    def _local_batch(self, ctx) -> int:
        return ctx.t.config.batch // ctx.world

    def state_dict(self):
        state = {"trajectories": self.trajectories}
        if self.cache is not None:
            state["cache"] = {"hits": self.cache.hits, "misses": self.cache.misses}
        if self.precision_check is not None:
            state["precision_check"] = self.precision_check
        return state

    def load_state_dict(self, state):
        self.trajectories = int(state.get("trajectories", 0))
        if self.cache is not None:
            counts = state.get("cache") or {}
            self.cache.hits, self.cache.misses = int(counts.get("hits", 0)), int(counts.get("misses", 0))
        if state.get("precision_check"):  # a resumed run keeps the precision its first batch chose
            self.traj.keep_precision(state["precision_check"])

    def release(self) -> None:
        """Give back what the run borrowed: a LoRA student's adapter and step condition leave the teacher's
        network, which is then as it was loaded."""
        if self.lora is not None and "lora" in self.student.net.config:
            net = self.student.net
            remove_lora(net)
            net.step_cond, net.config["step_condition"] = None, False

    def sampler_card(self) -> dict:
        cfg = self.cfg
        if len(self.grids) > 1:
            return {"name": "euler", "afs": cfg.afs, "nfe": max(self.grids), "final_zero": False, "clip": None,
                    "grids": {str(n): [float(s) for s in g[0]] for n, g in sorted(self.grids.items())}}
        (nfe, (s_grid, _)), = self.grids.items()
        spec = {"name": "euler", "afs": cfg.afs, "nfe": nfe, "final_zero": False, "clip": None,
                "sigmas": [float(s) for s in s_grid]}
        if self.student_step_cond is not None:
            spec["step"] = self.student_step_cond
        return spec

    def card(self) -> dict:
        cfg = self.cfg
        method = {"name": self.name, **asdict(cfg), "trajectories": self.trajectories,
                  "teacher_nfe_per_trajectory": {str(n): teacher_evaluations(cfg.teacher_solver, t)
                                                 for n, (_, t) in self.grids.items()}}
        if cfg.stage2:
            method["first_stage_nfe"] = self.stage2_teacher_nfe
        if self.prompts is not None:
            method["prompts"] = {"count": len(self.prompts), "distribution": "uniform",
                                 "sha256": hashlib.sha256("\n".join(self.prompts).encode()).hexdigest(),
                                 "negative_prompt": self.negative_prompt, "guidance": self.guidance}
        elif self.teacher.denoiser.num_classes:
            method["class_distribution"] = "uniform"
        if self.cache is not None:
            method["trajectory_cache"] = self.cache.summary()
        if self.precision_check is not None:
            method["teacher_precision_check"] = self.precision_check
        card = {"method": method, "sampler": self.sampler_card(), "teacher": self.teacher_ref,
                "data": self.teacher.card.get("data")}
        if self.prompts is not None:
            card["text"] = {"distilled_guidance": self.distilled_guidance, "negative_prompt": self.negative_prompt}
        return card

    @torch.no_grad()
    def preview(self, model, n, seed):
        nfe = max(self.grids)
        s_grid = self.grids[nfe][0]
        x = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed))
        x = x.to(next(model.parameters()).device) * float(s_grid[0])
        step = (self.student_step_cond or len(s_grid)) if model.has_step_condition else None
        text = None
        if self.prompts is not None:  # the first prompts of the list, every preview alike, at the model's guidance
            text = model.encode_prompts(self.prompts[:n], self.negative_prompt)
            labels = torch.arange(n, device=x.device) % len(text.prompts)
        else:
            labels = torch.arange(n, device=x.device) % model.num_classes if model.num_classes else None
        return solve("euler", model.with_step(step, labels, text), x, s_grid.to(x.device), afs=self.cfg.afs).x


def distill_sfd(teacher, out, config: SFDConfig | None = None, *, trajectories: int | None = None,
                trajectory_cache=None, prompts: list[str] | None = None, negative_prompt: str | None = None,
                guidance: float | None = None, resume: bool = False, run_info: dict | None = None,
                **options) -> Checkpoint:
    """Distil `teacher` (a loaded model, a built-in name or a checkpoint folder) with SFD into the folder `out`
    and return the student, loaded.

    SFD's own options come as `config` (an `SFDConfig`) or as keywords (`nfe=2` for SFD, `nfe=[2, 3, 4, 5]` for
    SFD-v, `stage2=True` for the 1-NFE stage from a first-stage student, ...); the training loop's as keywords
    too (`fewstep.recipe.LOOP_OPTIONS`: iters, batch, lr, ...). What is not given is the authors' recipe:
    `trajectories` 200,000 (four times that for SFD-v, ten times for the 1-NFE stage) at batch 128, so
    iterations = trajectories / batch; Adam at 5e-5 (5e-4 for the 1-NFE stage) divided by 10 at half the run;
    gradients clipped at norm 1 (none for the 1-NFE stage), fewstep's one departure from the authors.

    `trajectory_cache`: a folder where the teacher's trajectories are kept and reused exactly. A text teacher
    distils on `prompts` (default: fewstep's shipped list) at its card's guidance and negative prompt unless
    given. `resume=True` continues an interrupted run in `out`."""
    config = method_config(SFDConfig, config, take_config_options(SFDConfig, options), "distill_sfd")
    loop = check_loop_options(options, "distill_sfd")
    if trajectories is not None:
        trajectories = A.check("trajectories", trajectories, A.integer(1, 10**12))
    defaults = recipe(config.nfe, config.stage2)
    resolved = {**SFD_LOOP, **loop}
    if resolved["lr"] is None:
        resolved["lr"] = defaults["lr"]
    if resolved["grad_clip"] is None:
        resolved["grad_clip"] = defaults["grad_clip"]
    if resolved["iters"] is None:  # iterations follow from the trajectory budget, as in the paper
        resolved["iters"] = iterations_for(trajectories or defaults["trajectories"], resolved["batch"])
    teacher = as_model(teacher, device=pick_device(resolved["device"]), what="teacher")
    if run_info is None:
        run_info = api_run_info("distill_sfd", {"teacher": teacher, "out": str(out), **asdict(config),
                                                "trajectories": trajectories, **loop})
    method = SFD(teacher, config, teacher_ref=teacher_reference(teacher.path), trajectory_cache=trajectory_cache,
                 prompts=prompts, negative_prompt=negative_prompt, guidance=guidance)
    try:
        Trainer(method, TrainConfig.from_options(resolved), out, resume=resume, run_info=run_info).run()
    finally:
        method.release()
    return load_checkpoint(out, device=next(teacher.denoiser.parameters()).device)
