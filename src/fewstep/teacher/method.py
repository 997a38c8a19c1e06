"""Teacher training: the DDPM loss on a discrete VP table (ε-, x0- or v-prediction) or EDM's loss for a continuous
model, as a TrainMethod on the shared loop, and `train_teacher`, the call `fewstep train` and Python share."""
from __future__ import annotations


import torch

from fewstep import argtypes as A
from fewstep.data import load_dataset
from fewstep.checkpoint import Checkpoint, load_checkpoint
from fewstep.denoiser import Denoiser
from fewstep.devices import pick_device
from fewstep.errors import FewstepError, option
from fewstep.nets import MLP, UNet
from fewstep.recipe import check_loop_options, loop_recipe
from fewstep.recipe import run_info as api_run_info
from fewstep.sampling import grid_for
from fewstep.schedule import Schedule
from fewstep.solvers import solve
from fewstep.train import StepContext, TrainConfig, Trainer, TrainMethod

# EDM's training noise distribution: ln σ ~ N(P_MEAN, P_STD²)
P_MEAN, P_STD = -1.2, 1.2


def default_net(sample_shape: tuple, dropout: float | None = None, channels: int | None = None):
    """A network sized for this machine's built-in data: ~1M-parameter U-Nets, a 4-block MLP for 2-D."""
    if len(sample_shape) == 1:
        return MLP(dim=sample_shape[0], hidden=channels or 256, depth=4, dropout=dropout or 0.0)
    c, h, w = sample_shape
    if h != w:
        raise FewstepError(f"images must be square for the built-in U-Net, got {h}x{w}; pass {option('resolution')}")
    if h <= 8:
        cfg = dict(channel_mult=(1, 2), attn_resolutions=(4,))
    elif h <= 16:
        cfg = dict(channel_mult=(1, 2, 2), attn_resolutions=(8,))
    else:
        cfg = dict(channel_mult=(1, 2, 2), attn_resolutions=(h // 4,))
    return UNet(resolution=h, in_channels=c, channels=channels or 32, num_res_blocks=2,
                dropout=0.1 if dropout is None else dropout, **cfg)


def make_denoiser(net, param: str = "eps", schedule: str = "linear", T: int = 1024,
                  sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5) -> Denoiser:
    if param == "edm":
        return Denoiser(net, Schedule.edm(sigma_min, sigma_max, sigma_data), "edm")
    return Denoiser(net, Schedule.vp(schedule, T), param)


class TeacherTraining(TrainMethod):
    name = "teacher"
    needs_data = True

    def __init__(self, denoiser: Denoiser, data_info: dict, sampler: dict | None = None):
        self.den = denoiser
        self.data_info = data_info
        self.sampler = sampler or {"name": "dpmpp2m", "nfe": 50, "grid": "polynomial" if denoiser.param == "edm"
                                   else "logsnr", "rho": 7.0, "final_zero": True, "clip": None}

    def trainable(self):
        return self.den

    def train_step(self, ctx: StepContext, batch, gen):
        den = self.den
        B = batch.shape[0]
        # noise levels and ε are drawn for the global batch, then sliced: identical across process counts
        gb = B * ctx.world
        eps = ctx.local(torch.randn((gb, *batch.shape[1:]), generator=gen)).to(batch.device)
        if den.schedule.is_discrete:
            idx = ctx.local(torch.randint(0, den.schedule.T, (gb,), generator=gen))
            sigma = den.schedule.sigmas[idx].to(batch.device)
            x = batch + den._bcast(sigma, batch) * eps
            with ctx.autocast():
                raw = den.raw(x, sigma)
            if den.param == "eps":
                target = eps
            elif den.param == "x0":
                target = batch
            else:  # v = a·ε − b·x0 with a = 1/sqrt(1+σ²), b = σ·a
                a = den._bcast(1 / (1 + sigma**2).sqrt(), batch)
                target = a * eps - a * den._bcast(sigma, batch) * batch
            loss = (raw.float() - target).square().mean()
        else:
            sd = den.schedule.sigma_data
            sigma = ctx.local((torch.randn(gb, generator=gen) * P_STD + P_MEAN).exp()).to(batch.device)
            weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
            x = batch + den._bcast(sigma, batch) * eps
            with ctx.autocast():
                x0 = den(x, sigma)
            per = (x0.float() - batch).square().reshape(B, -1).mean(1)
            loss = (weight.float() * per).mean()
        gnorm = ctx.step(loss)
        return {"loss": float(loss.detach()), "grad_norm": gnorm}

    def card(self):
        return {"method": {"name": "teacher", "objective": "edm" if self.den.param == "edm" else f"ddpm-{self.den.param}"},
                "sampler": self.sampler, "teacher": None, "data": self.data_info}

    def preview(self, model, n, seed):
        shape = (n, *self.data_info["shape"])
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(next(model.parameters()).device)
        grid = grid_for(model, "dpmpp2m", 25, self.sampler.get("grid", "polynomial"), final_zero=True)
        return solve("dpmpp2m", model, x * float(grid[0]), grid.to(x.device)).x


# ---- the run: one call for Python and the command line -----------------------------------------------

TEACHER_LOOP = loop_recipe(iters=20000, batch=128, lr=2e-4, ema=0.999)
PARAMS, SCHEDULES = ("eps", "x0", "v", "edm"), ("linear", "cosine", "sigmoid")


def train_teacher(data, out, *, resolution: int | None = None, data_seed: int = 0, param: str = "eps",
                  schedule: str = "linear", T: int = 1024, channels: int | None = None, dropout: float | None = None,
                  resume: bool = False, run_info: dict | None = None, **options) -> Checkpoint:
    """Train a teacher diffusion model on `data` (a built-in name such as "digits", an image folder, or a
    .npz/.npy array) into the folder `out`, and return it, loaded.

    `param`: eps, x0 or v on a discrete VP table of `T` steps with the `schedule`'s betas, or edm (a continuous
    EDM model). The network is fewstep's U-Net (an MLP for 2-D data) sized for the data, `channels` wide.
    Training-loop keywords (`fewstep.recipe.LOOP_OPTIONS`) default to 20,000 iterations at batch 128, Adam 2e-4,
    EMA 0.999, gradients clipped at norm 1."""
    loop = check_loop_options(options, "train_teacher")
    param = A.check("param", param, A.choice(PARAMS))
    schedule = A.check("schedule", schedule, A.choice(SCHEDULES))
    T = A.check("T", T, A.integer(2, 100_000))
    data_seed = A.check("data_seed", data_seed, A.seed)
    resolution = None if resolution is None else A.check("resolution", resolution, A.resolution)
    channels = None if channels is None else A.check("channels", channels, A.integer(1, 4096))
    dropout = None if dropout is None else A.check("dropout", dropout, A.probability)
    resolved = {**TEACHER_LOOP, **loop}
    if run_info is None:
        run_info = api_run_info("train_teacher", {
            "data": data, "out": str(out), "resolution": resolution, "data_seed": data_seed, "param": param,
            "schedule": schedule, "T": T, "channels": channels, "dropout": dropout, **loop})
    ds = load_dataset(data, resolution=resolution, split="train", seed=data_seed)
    with torch.random.fork_rng(devices=[]):  # the seed fixes the initial weights too: same command, same model
        torch.manual_seed(resolved["seed"])
        net = default_net(tuple(ds.shape), dropout=dropout, channels=channels)
    den = make_denoiser(net, param, schedule, T)
    data_info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape), "split_seed": data_seed}
    Trainer(TeacherTraining(den, data_info), TrainConfig.from_options(resolved), out, data=ds.x,
            resume=resume, run_info=run_info).run()
    return load_checkpoint(out, device=pick_device(resolved["device"]))
