"""Write docs/results.md from finished benches (figures copied to docs/figures).

    python scripts/results_doc.py [--bench-root bench] [--out docs]

Reads BENCH_ROOT/{toy,digits,digits-defaults,mnist}; a preset not run yet gets the command that runs it. `make results`
runs those presets first (finished rows are reused, so a rerun only does what is missing).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fewstep.results_page import write_results_doc

PRESETS = ("toy", "digits", "digits-defaults", "mnist")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-root", default="bench")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    root = Path(args.bench_root)
    benches = {name: root / name for name in PRESETS}
    commands = {name: f"fewstep bench --preset {name} --out {root / name}" for name in PRESETS}
    print(f"wrote {write_results_doc(benches, args.out, commands)}")


if __name__ == "__main__":
    main()
