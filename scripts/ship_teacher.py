"""Copy a trained teacher into the package as a built-in model, with its measured quality on the card.

    python scripts/ship_teacher.py RUN_DIR NAME [--nfe 256] [--sampler dpmpp2m] [--n 1000]
    python scripts/ship_teacher.py --quality-from docs/data/digits.json NAME

The card keeps the training command (its --out as runs/NAME), seed and wall time the run recorded, and gains a
"quality" section: the teacher's own metrics (at --nfe, default 256) against the training split. With
--quality-from, the shipped model's quality section is the teacher row of a finished bench instead (the
bench's protocol: its sample count, seeds, reference split and intervals), and nothing else changes.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fewstep.checkpoint import CARD_NAME, WEIGHTS_NAME, load_checkpoint, write_json
from fewstep.metrics import evaluate_samples
from fewstep.models import ASSETS
from fewstep.sampling import sample


def quality_from_bench(results: Path) -> dict:
    """The card's quality block from a bench's results.json: its teacher row and the protocol that measured it."""
    summary = json.loads(Path(results).read_text())
    spec, key = summary["spec"], summary["quality_key"]
    row = next(r for r in summary["rows"] if r["method"] == "teacher")
    numbers = {k: round(v["mean"], 6) for k, v in row["quality"].items()}
    if len(spec["seeds"]) > 1:
        numbers.update({f"{k}_std": round(v["std"], 6) for k, v in row["quality"].items() if k == key})
    return {"sampler": row["sampler"], "nfe": row["nfe"], "n": spec["n_samples"], "seeds": spec["seeds"],
            "reference": summary.get("metric_reference"), "intervals": spec.get("fd_intervals") or None,
            "measured_by": f"fewstep bench --preset {Path(results).stem} (docs/results.md)", **numbers}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("name")
    ap.add_argument("--quality-from", metavar="RESULTS_JSON",
                    help="only rewrite the shipped NAME's quality block from this bench's teacher row")
    ap.add_argument("--nfe", type=int, default=256)
    ap.add_argument("--sampler", default="dpmpp2m")
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    if args.quality_from:
        card = json.loads((ASSETS / args.name / CARD_NAME).read_text())
        card["quality"] = quality_from_bench(Path(args.quality_from))
        write_json(ASSETS / args.name / CARD_NAME, card)
        load_checkpoint(ASSETS / args.name)  # still loads, its hash unchanged
        print(f"{args.name}: quality from {args.quality_from}: {card['quality']}")
        return
    ckpt = load_checkpoint(args.run_dir)
    data = ckpt.card["data"]["name"]
    x, info = sample(ckpt, args.n, seed=0, nfe=args.nfe, sampler=args.sampler, return_info=True)
    metrics = evaluate_samples(x, data, resolution=ckpt.card["data"].get("resolution"),
                               split_seed=ckpt.card["data"].get("split_seed", 0))
    dest = ASSETS / args.name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(args.run_dir) / WEIGHTS_NAME, dest / WEIGHTS_NAME)
    card = dict(ckpt.card)
    tr = card.get("training") or {}
    if not tr.get("finished"):
        tr["note"] = (f"stopped by the user at iteration {tr.get('iterations')} (Ctrl-C / SIGTERM saves state); "
                      "these are the EMA weights at that point")
    if tr.get("command"):  # the machine it was trained on is nobody's business: the run folder, relative
        tr["command"] = tr["command"].replace(f"--out {Path(args.run_dir).resolve()}", f"--out runs/{args.name}")
        tr["command"] = tr["command"].replace(f"--out {args.run_dir}", f"--out runs/{args.name}")
    card["quality"] = {"sampler": args.sampler, "nfe": info["nfe"], "n": args.n, "seed": 0,
                       "reference": metrics["reference"],
                       **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()
                          if k not in ("reference", "about")}}
    write_json(dest / CARD_NAME, card)
    load_checkpoint(dest)  # verifies the hash on the card
    print(f"shipped {args.run_dir} as {args.name}: {card['quality']}")


if __name__ == "__main__":
    main()
