"""Quality along a distillation: score every snapshot a run wrote (`snapshots/`, written with the bench's
curve points or TrainConfig.snapshot_every) on N samples of one seed, with a 95 % interval on the Fréchet
distance, and write the curve as JSON (one record a snapshot: iterations, trajectories, wall time, FCD).

    python scripts/score_snapshots.py RUN_DIR --data digits --n 10000 --out curve.json

An SFD-v run is scored at each `--nfe` it was trained for. The run's final model is scored too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

import fewstep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder with snapshots/ (e.g. a bench's models/sfd-2)")
    p.add_argument("--data", required=True, help="the data set the FCD reference comes from (e.g. digits)")
    p.add_argument("--n", type=int, default=10_000, help="samples per point (default 10,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--intervals", type=int, default=200, help="random halves for the 95 %% interval (default 200)")
    p.add_argument("--nfe", default=None, help="SFD-v: comma list of its NFEs to score (default: every one)")
    p.add_argument("--out", type=Path, required=True, help="the curve as JSON")
    args = p.parse_args(argv)
    model = fewstep.load(args.run)
    grids = model.sampler.get("grids")
    nfes = [int(v) for v in args.nfe.split(",")] if args.nfe else sorted(int(k) for k in grids) if grids else [None]
    batch = (model.card.get("training") or {}).get("batch")
    log = args.run / "snapshots" / "snapshots.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    final = {"step": model.card["training"]["iterations"], "wall_s": model.card["training"]["wall_time_s"],
             "file": None}
    if not entries or entries[-1]["step"] != final["step"]:
        entries.append(final)
    points = []
    for e in entries:
        if e["file"] is not None:
            model.denoiser.net.load_state_dict(load_file(str(args.run / "snapshots" / e["file"])))
        else:
            model = fewstep.load(args.run)
        for nfe in nfes:
            t0 = time.perf_counter()
            s = fewstep.sample(model, args.n, seed=args.seed, nfe=nfe, progress=False)
            r = fewstep.evaluate(s, args.data, metrics="fcd", intervals=args.intervals)
            point = {"iterations": e["step"], "trajectories": e["step"] * batch if batch else None,
                     "distill_wall_s": e["wall_s"], "nfe": s.info["nfe"], "n": r["n"], "fcd": r["fcd"],
                     "fcd_95": [r.get("fcd_ci_low"), r.get("fcd_ci_high")],
                     "score_s": round(time.perf_counter() - t0, 1)}
            points.append(point)
            print(json.dumps(point), flush=True)
    args.out.write_text(json.dumps({"run": str(args.run), "data": args.data, "seed": args.seed, "points": points},
                                   indent=1) + "\n")
    print(f"{len(points)} points -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
