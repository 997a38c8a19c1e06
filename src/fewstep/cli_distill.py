"""`fewstep distill {sfd, sfddm, progressive}`, `compare` and `interpolate`: wiring of the distillation
methods to the command line. Each method's section registers its own sub-command."""
from __future__ import annotations

import argparse


def register(sub):
    d = sub.add_parser("distill", help="distil a teacher into a few-step student")
    methods = d.add_subparsers(dest="method", required=True, metavar="METHOD")
    for add in (add_sfd, add_sfddm, add_progressive):
        add(methods)
    add_compare(sub)
    add_interpolate(sub)


# ---- SFD ------------------------------------------------------------------------------------------
def add_sfd(methods):
    from fewstep.cli import _nfe_list, add_train_args
    from fewstep.distill.sfd import TEACHER_SOLVERS

    p = methods.add_parser("sfd", help="Simple and Fast Distillation (data-free; SFD, SFD-v, 1-NFE stage)",
                           description="Distil a teacher into a few-step Euler sampler without training data. "
                                       "One NFE gives SFD; a list (e.g. 2,3,4,5) gives SFD-v, one model for all.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint or built-in name (e.g. digits-teacher)")
    p.add_argument("--nfe", type=_nfe_list, default=[2], help="student NFE, or a list for SFD-v (default 2)")
    p.add_argument("--afs", action=argparse.BooleanOptionalAction, default=True,
                   help="analytical first step: saves one network call (default on)")
    p.add_argument("--m", type=int, default=3, help="teacher points inserted per student interval (default 3)")
    p.add_argument("--teacher-solver", default="dpmpp3m", choices=TEACHER_SOLVERS)
    p.add_argument("--grid", default="polynomial", choices=["polynomial", "logsnr", "uniform", "discrete"])
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--sigma-min", type=float, default=None, help="default: the teacher's (0.006 for EDM teachers)")
    p.add_argument("--sigma-max", type=float, default=None, help="default: the teacher's (80 for EDM teachers)")
    p.add_argument("--trajectories", type=int, default=200_000,
                   help="teacher trajectories to train on (default 200000; iterations = trajectories / batch)")
    p.add_argument("--loss-reduction", default="sum", choices=["sum", "mean"],
                   help="L1 summed over pixels (paper) or averaged")
    p.add_argument("--thresholding", action="store_true", help="clip the teacher's x0 estimate to [-1, 1]")
    p.add_argument("--dropout", type=float, default=None, help="student dropout (default: the teacher's)")
    p.add_argument("--stage2", action="store_true", help="1-NFE second stage from a first-stage SFD/SFD-v model")
    p.add_argument("--perceptual", default=None, choices=["classifier"],
                   help="second stage: perceptual term on the last step with fewstep's shipped classifier")
    p.add_argument("--perceptual-weight", type=float, default=1.0)
    add_train_args(p, steps=0, batch=128, lr=5e-5, lr_schedule="step")
    p.set_defaults(func=cmd_sfd)


def cmd_sfd(args):
    from fewstep.checkpoint import load_checkpoint, teacher_reference
    from fewstep.cli import run_info, train_config
    from fewstep.distill.sfd import SFD, SFDConfig, iterations_for
    from fewstep.train import Trainer, pick_device

    device = pick_device(args.device)
    teacher = load_checkpoint(args.teacher, device=device)
    cfg = SFDConfig(nfe=args.nfe, afs=args.afs, m=args.m, teacher_solver=args.teacher_solver, grid=args.grid,
                    rho=args.rho, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                    loss_reduction=args.loss_reduction, thresholding=args.thresholding, dropout=args.dropout,
                    stage2=args.stage2, perceptual=args.perceptual, perceptual_weight=args.perceptual_weight)
    perceptual = None
    if args.perceptual == "classifier":
        from fewstep.featnet import load_classifier
        data = teacher.card.get("data") or {}
        clf = load_classifier(data.get("name", "?"), (data.get("shape") or [0, 0])[-1]).to(device).eval()
        for q in clf.parameters():
            q.requires_grad_(False)
        perceptual = lambda x: clf.forward_with_features(x)[1]  # noqa: E731
    method = SFD(teacher, cfg, teacher_ref=teacher_reference(args.teacher), perceptual_net=perceptual)
    if args.steps == 0:  # iterations follow from the trajectory budget, as in the paper
        args.steps = iterations_for(args.trajectories, args.batch)
    Trainer(method, train_config(args), args.out, resume=args.resume, run_info=run_info(args)).run()
    print(f"{method.name} student saved to {args.out} "
          f"(sample it with: fewstep sample {args.out}{' --nfe N' if len(method.grids) > 1 else ''})")


# ---- SFDDM ----------------------------------------------------------------------------------------
def add_sfddm(methods):
    pass


# ---- progressive distillation -----------------------------------------------------------------------
def add_progressive(methods):
    pass


# ---- compare / interpolate ------------------------------------------------------------------------
def add_compare(sub):
    pass


def add_interpolate(sub):
    pass
