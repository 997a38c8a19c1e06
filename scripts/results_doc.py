"""Write docs/results.md from finished benches (figures copied to docs/figures).

    python scripts/results_doc.py [--bench-root bench] [--out docs]

Reads BENCH_ROOT/<preset> for each of fewstep.results_page.RESULT_PRESETS; a preset not run yet gets the command
that runs it. `make results` runs those benches first (finished rows are reused, so a rerun only does what is
missing; the authors'-budget presets are measured as far as their runs have got).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fewstep.results_page import RESULT_PRESETS, bench_command, write_results_doc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-root", default="bench")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    root = Path(args.bench_root)
    benches = {name: root / name for name in RESULT_PRESETS}
    commands = {name: bench_command(name, root) for name in RESULT_PRESETS}
    print(f"wrote {write_results_doc(benches, args.out, commands)}")


if __name__ == "__main__":
    main()
