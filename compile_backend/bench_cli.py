"""``python -m compile_backend bench ...``: the benchmark runner in ``benchmarks/bench.py``."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        from benchmarks.bench import main as run
    except ImportError as exc:  # the benchmarks package ships beside compile_backend
        print(f"error: the benchmarks package is not importable ({exc}); run from the repository "
              "root or install the project with pip", file=sys.stderr)
        return 2
    return run(argv, prog="python -m compile_backend bench")
