"""Command line: ``python -m compile_backend {demo,bench,cache} ...``."""
from __future__ import annotations

import sys

COMMANDS = {
    "demo": "compile a zoo model suited to this device, print the report and the time against eager",
    "bench": "trtexec-like benchmark: latency, compile time, accuracy vs eager and Inductor",
    "cache": "list | info | clear | prune the on-disk engine cache",
}
USAGE = ("usage: python -m compile_backend {demo,bench,cache} [options]\n"
         + "\n".join(f"  {name:<6} {text}" for name, text in COMMANDS.items()))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)} "
              "(python -m compile_backend --help)", file=sys.stderr)
        return 2
    if command == "demo":
        from .demo import main as run
    elif command == "bench":
        from .bench_cli import main as run
    else:
        from .cache.cli import main as run
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
