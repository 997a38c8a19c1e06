"""SFD's ceiling: the teacher's own trajectory that an SFD student at NFE N is trained to match — the teacher
solver over SFD's refined grid (the student's timestamps with `m` points inserted per interval), its last
state — scored like a student, from the noises `fewstep sample --seed S` draws. A student matching its targets
exactly lands here. Scored in FCD, so for image teachers whose data has a classifier (digits, MNIST, a folder
with `--classifier` given to `fewstep eval`).

    python scripts/sfd_ceiling.py --teacher digits-teacher --data digits --nfe 2,3,4,5 --n 10000 --out ceiling.json
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
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--intervals", type=int, default=200)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    teacher = fewstep.load(args.teacher)
    den = teacher.denoiser
    noise = torch.randn((args.n, *sample_shape(teacher.card)), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for nfe in (int(v) for v in args.nfe.split(",")):
        cfg = SFDConfig(nfe=nfe)  # fewstep's defaults: DPM-Solver++(3M), m = 3, final orders 2 then 1
        s_grid, t_grid = sfd_grids(den, cfg, nfe)
        parts = []
        with torch.no_grad():
            for i in range(0, args.n, 1000):
                r = solve(cfg.teacher_solver, den, noise[i:i + 1000] * float(s_grid[0]), t_grid,
                          lower_order_final=cfg.teacher_final_orders)
                parts.append(r.x)
        m = fewstep.evaluate(torch.cat(parts), args.data, metrics="fcd", intervals=args.intervals)
        row = {"nfe": nfe, "teacher_nfe": r.nfe, "n": m["n"], "fcd": m["fcd"],
               "fcd_95": [m.get("fcd_ci_low"), m.get("fcd_ci_high")]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"teacher": args.teacher, "data": args.data, "seed": args.seed, "rows": rows},
                                   indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
