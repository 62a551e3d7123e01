"""``python -m benchmarks ...``: the benchmark runner (see benchmarks/bench.py)."""
import sys

from benchmarks.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks"))
