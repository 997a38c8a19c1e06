"""Where distillation time goes, per method, against the network floor; and what a setting changes.

    OMP_NUM_THREADS=1 python scripts/profile_distill.py --iters 5 --compare channels_last=off,on
    python scripts/profile_distill.py --methods sfd,sfd-v --compare teacher_precision=fp32,bf16
    python scripts/profile_distill.py --teacher mnist16-teacher --data mnist --resolution 16 --compare channels_last=auto

Runs SFD (NFE 2), SFD-v (NFE 2-5), SFDDM (T' = 10) and one progressive fold (256 -> 128 steps) on a
teacher (default the shipped digits teacher) with the bench's batches, for each setting in turn, interleaved method by method
(the machine is shared: ratios come from one process, medians over iterations; the first is warm-up).
Prints per method and setting: teacher / student fwd+bwd / optimizer / rest / iteration / floor / overhead.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from fewstep.models import load_model
from fewstep.data import load_dataset
from fewstep.sfd.config import SFDConfig
from fewstep.sfd.method import SFD
from fewstep.train import TrainConfig, Trainer

PARTS = ("teacher", "student", "optimizer", "rest", "iter")


def method(name: str, teacher, sfd_setting: dict):
    den = teacher.denoiser
    if name in ("sfd", "sfd-v"):
        return SFD(teacher, SFDConfig(nfe=[2] if name == "sfd" else [2, 3, 4, 5], **sfd_setting)), 128
    if name == "sfddm":
        from fewstep.sfddm.config import SFDDMConfig
        from fewstep.sfddm.method import SFDDM
        return SFDDM(den, SFDDMConfig(steps=10)), 64
    from fewstep.progressive.fold import ProgressiveFold, teacher_grid
    return ProgressiveFold(den, teacher_grid(den, 256)), 64


def run(name: str, setting: dict, iters: int, data, teacher_name: str) -> list[dict]:
    teacher = load_model(teacher_name)
    # a setting of SFD's own (teacher_precision) goes to SFD and SFD-v; any other to the training loop
    sfd_keys = {f.name for f in fields(SFDConfig)}
    m, batch = method(name, teacher, {k: v for k, v in setting.items() if k in sfd_keys})
    loop = {k: v for k, v in setting.items() if k not in sfd_keys}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(steps=iters, batch=batch, lr=1e-4, progress=False, log_every=1, n_preview=0, **loop)
        Trainer(m, cfg, out, data=data if m.needs_data else None).run()
        recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return recs[1:]  # the first iteration warms up


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--teacher", default="digits-teacher", help="checkpoint or built-in name")
    ap.add_argument("--data", default="digits", help="the teacher's data set (SFDDM and progressive use it)")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--methods", default="sfd,sfd-v,sfddm,progressive")
    ap.add_argument("--compare", default="channels_last=off,on",
                    help="KEY=V1,V2: a TrainConfig setting, or SFD's teacher_precision, to compare "
                         "(default channels_last=off,on)")
    args = ap.parse_args()
    key, values = args.compare.split("=")
    values = values.split(",")
    torch.manual_seed(0)
    data = load_dataset(args.data, args.resolution, split="train").x
    res = {}
    for name in args.methods.split(","):
        for v in values:
            res[(name, v)] = run(name, {key: v}, args.iters, data, args.teacher)
    med = lambda recs, k: statistics.median(r[k] for r in recs)  # noqa: E731
    print(f"| method | {key} | teacher s | student fwd+bwd s | optimizer s | rest s | iteration s "
          "| floor s (teacher + student) | overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, v), recs in res.items():
        cells = [f"{med(recs, f'time_{p}_s'):.3f}" for p in PARTS]
        over = statistics.median(r["time_iter_s"] / r["floor_s"] for r in recs)
        print(f"| {name} | {v} | " + " | ".join(cells) + f" | {med(recs, 'floor_s'):.3f} "
              f"({med(recs, 'floor_teacher_s'):.3f} + {med(recs, 'floor_student_s'):.3f}) | {over:.3f} |")
    if len(values) == 2:
        print()
        for name in args.methods.split(","):
            a, b = res[(name, values[0])], res[(name, values[1])]
            # iterations paired by step (the same batch and, for SFD-v, the same N), median of the ratios
            ratio = lambda k: statistics.median(rb[k] / ra[k] for ra, rb in zip(a, b))  # noqa: E731
            print(f"{name}: {key}={values[1]} / {values[0]}: iteration {ratio('time_iter_s'):.3f}, "
                  f"teacher part {ratio('time_teacher_s'):.3f}, student part {ratio('time_student_s'):.3f}, "
                  f"floor {ratio('floor_s'):.3f}")


if __name__ == "__main__":
    main()
