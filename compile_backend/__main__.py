"""Command line: ``python -m compile_backend {demo,bench,cache} ...``."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("demo", "bench", "cache")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m compile_backend {demo,bench,cache} [options]\n"
              "  demo   compile a zoo model suited to this device, print the report and the time against eager\n"
              "  bench  trtexec-like benchmark: latency, compile time, accuracy vs eager and Inductor\n"
              "  cache  list | info | clear | prune the on-disk engine cache")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as run
    elif command == "bench":
        from .bench_cli import main as run
    else:
        from .cache.cli import main as run
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
