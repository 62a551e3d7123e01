"""``python -m benchmarks ...``: the benchmark runner (``python -m compile_backend bench``)."""
import sys

from compile_backend.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks"))
