"""``python -m benchmarks.fuzz``: differential fuzzing of compile_backend against eager.

    python -m benchmarks.fuzz --n 2000 --mode both --seed 0 --validate both \\
        --out benchmarks/results/fuzz_summary.json
    python -m benchmarks.fuzz --only-seed 12 --mode interpret --validate false   # one case, with its repro
"""
from __future__ import annotations

import argparse
import json
import sys

from .session import case_seed, format_summary, run_session


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="number of cases")
    ap.add_argument("--mode", choices=("plain", "interpret", "both"), default="both",
                    help="plain: TRITON_INTERPRET=0 (ATen path); interpret: Triton kernels in the interpreter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validate", choices=("true", "false", "both"), default="both")
    ap.add_argument("--out", help="write the summary (counts, signatures with repros, failures) as JSON")
    ap.add_argument("--minimize", type=int, default=20, help="at most this many failures are minimised")
    ap.add_argument("--max-attempts", type=int, default=60, help="compiles per minimisation")
    ap.add_argument("--only-seed", type=int, help="run this one program seed (with every mode/validate asked)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    modes = ["plain", "interpret"] if args.mode == "both" else [args.mode]
    validates = {"true": [True], "false": [False], "both": [True, False]}[args.validate]
    if args.only_seed is not None:
        seeds = [args.only_seed] * (len(modes) * len(validates))
    else:
        seeds = [case_seed(args.seed, i) for i in range(args.n)]
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    summary = run_session(seeds, modes, validates, minimize=args.minimize, max_attempts=args.max_attempts, log=log)
    print(format_summary(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        print(f"\nsummary written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
