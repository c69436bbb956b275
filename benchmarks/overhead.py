"""Step-time overhead of gradguard vs bare AdamW (and clip_grad_norm_, zclip, autoclip).

Run:  OMP_NUM_THREADS=1 python benchmarks/overhead.py [--quick]
Writes benchmarks/results/overhead.json (ratios measured in one process).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradguard.cli.bench import format_report, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead.json"))
    args = ap.parse_args()
    print(format_report(run(quick=args.quick, out=args.out)))
