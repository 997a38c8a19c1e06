"""SFD's ceiling: the teacher's own trajectory that an SFD student at NFE N is trained to match — the teacher
solver over SFD's refined grid (the student's timestamps with `m` points inserted per interval), its last
state — scored like a student, from the noises `fewstep sample --seed S` draws. A student matching its targets
exactly lands here. `--m` with several values refines the grid further (the teacher's ODE solved ever more
closely on the same path), to see whether a ceiling's quality is the ODE's or its discretization's. Scored in
FCD, so for image teachers whose data has a classifier (digits, MNIST, a folder with `--classifier` given to
`fewstep eval`).

    python scripts/sfd_ceiling.py --teacher digits-teacher --data digits --nfe 2,3,4,5 --n 10000 --out ceiling.json
    python scripts/sfd_ceiling.py --teacher mnist16-teacher --data mnist --nfe 2 --m 3,11,32 --n 2000 --out m.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fewstep
from fewstep.sfd.config import SFDConfig
from fewstep.sfd.trajectory import sfd_grids
from fewstep.sampling import sample_shape
from fewstep.solvers import solve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True, help="the data set the FCD reference comes from")
    p.add_argument("--nfe", default="2,3,4,5", help="student NFEs (default 2,3,4,5)")
    p.add_argument("--m", default="3", help="points inserted per student interval (default 3, SFD's; a comma list "
                                            "scores each)")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--intervals", type=int, default=200)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    teacher = fewstep.load(args.teacher)
    den = teacher.denoiser
    noise = torch.randn((args.n, *sample_shape(teacher.card)), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for nfe, m in ((int(v), int(k)) for v in args.nfe.split(",") for k in args.m.split(",")):
        cfg = SFDConfig(nfe=nfe, m=m)  # fewstep's defaults otherwise: DPM-Solver++(3M), final orders 2 then 1
        s_grid, t_grid = sfd_grids(den, cfg, nfe)
        parts = []
        with torch.no_grad():
            for i in range(0, args.n, 1000):
                r = solve(cfg.teacher_solver, den, noise[i:i + 1000] * float(s_grid[0]), t_grid,
                          lower_order_final=cfg.teacher_final_orders)
                parts.append(r.x)
        scores = fewstep.evaluate(torch.cat(parts), args.data, metrics="fcd", intervals=args.intervals)
        row = {"nfe": nfe, "m": m, "teacher_nfe": r.nfe, "n": scores["n"], "fcd": scores["fcd"],
               "fcd_95": [scores.get("fcd_ci_low"), scores.get("fcd_ci_high")]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"teacher": args.teacher, "data": args.data, "seed": args.seed, "rows": rows},
                                   indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
