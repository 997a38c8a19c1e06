"""`fewstep bench` and `fewstep demo`: wiring of the benchmark to the command line."""
from __future__ import annotations

import time
from pathlib import Path

from fewstep import api
from fewstep import argtypes as A
from fewstep.benchspec import PRESETS, BenchSpec, bench_methods, method_settings, preset
from fewstep.cli.common import COMMAND_HELP
from fewstep.errors import FewstepError
from fewstep.report import profile_table, results_table


def register(sub):
    b = sub.add_parser("bench", help=COMMAND_HELP["bench"],
                       description="Runs the teacher reference, training-free solvers and every distillation "
                                   "method on one teacher with fixed seeds. Finished work in --out is reused.")
    b.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="toy: 2-D gmm8 (its 46 rows took 82 min on one CPU thread); digits: the full table with "
                        "every SFD recipe setting trained both ways (hours); mnist: the same on the 16x16 MNIST "
                        "teacher, with a long SFDDM run (hours); digits-defaults: the digits preset's SFD family with "
                        "fewstep's defaults in place of the authors' recipe; digits-authors, mnist-authors: the SFD family "
                        "at the authors' budgets (days; train with --distill-only, measure with --as-reached); demo: "
                        "the quick tour at short budgets (4-5 min)")
    b.add_argument("--teacher", default=None, help="teacher checkpoint (overrides the preset's)")
    b.add_argument("--data", default=None, help="data set the teacher models (needed without a preset)")
    b.add_argument("--resolution", type=int, default=None)
    b.add_argument("--methods", default=None,
                   help=f"comma list of {', '.join(bench_methods())}")
    b.add_argument("--nfe", type=A.nfe_list, default=None,
                   help="NFEs for solvers and SFD (SFD: those up to 10), e.g. 2,4,8")
    b.add_argument("--curve-points", type=A.integer(0, 1000), default=None,
                   help="snapshots scored along each distillation for the quality-against-time plot (0: none; "
                        "default: the preset's)")
    b.add_argument("--n", dest="n_samples", type=int, default=None, help="samples per seed")
    b.add_argument("--seeds", default=None, help="sample seeds, e.g. 0,1,2 (default 0,1,2)")
    for settings in method_settings().values():  # each method's own settings (--sfd-batch, --sfddm-steps, ...)
        settings.add_bench_arguments(b)
    b.add_argument("--out", required=True, type=A.folder)
    b.add_argument("--device", type=A.device, default="auto")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--distill-only", action="store_true",
                   help="train every model the bench needs (in its row order) and measure nothing; a later run "
                        "without it measures them")
    b.add_argument("--as-reached", action="store_true",
                   help="train nothing: measure each distillation as far as it has got (its latest snapshot, "
                        "while another process may still train it); rows name the iterations reached, and rows "
                        "whose run has not started are left out")
    b.add_argument("--profile", action="store_true",
                   help="also print where each distillation's time goes against its network floor "
                        "(teacher / student forward+backward / optimizer / rest per iteration)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help=COMMAND_HELP["demo"])
    d.add_argument("--out", default="demo-out", type=A.folder, help="output folder (default demo-out)")
    d.add_argument("--device", type=A.device, default="auto")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)


def _spec(args):
    overrides = dict(teacher=args.teacher, data=args.data, resolution=args.resolution, nfe=args.nfe,
                     n_samples=args.n_samples, methods=args.methods.split(",") if args.methods else None,
                     curve_points=args.curve_points,
                     seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None)
    for settings in method_settings().values():
        overrides.update(settings.overrides(args))
    if args.preset:
        return preset(args.preset, **overrides)
    if not args.teacher or not args.data:
        raise FewstepError("bench: pass --preset, or both --teacher and --data")
    return BenchSpec.from_fields(**{k: v for k, v in overrides.items() if v is not None})


def run_bench(spec, out, device, progress, profile=False, distill_only=False, as_reached=False):
    t0 = time.perf_counter()
    summary = api.run_bench(out, spec=spec, device=device, progress=progress, distill_only=distill_only,
                            as_reached=as_reached)
    if distill_only:
        print(f"models distilled or found in {Path(out) / 'models'} in {time.perf_counter() - t0:.0f} s")
        return None
    print()
    print(results_table(summary))
    if profile:
        table = profile_table(summary)
        print("\ndistillation time per iteration against its network floor (the same calls timed alone):\n"
              + (table or "(no distillation rows)"))
    print(f"\nbench wall time {time.perf_counter() - t0:.0f} s; report: {Path(out) / 'report.md'}")
    return summary


def cmd_bench(args):
    run_bench(_spec(args), args.out, args.device, not args.no_progress, profile=args.profile,
              distill_only=args.distill_only, as_reached=args.as_reached)


def cmd_demo(args):
    run_bench(preset("demo"), args.out, args.device, not args.no_progress)
