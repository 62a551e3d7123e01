"""``python -m compile_backend cache list|info|clear|prune``: look at and tidy the engine cache.

    list                   every entry: architecture, toolchain, size, hits, last use; totals
    info [ENTRY]           the cache directory, its size against the cap, per-arch totals; with an
                           entry digest (or a unique prefix): its manifest and an integrity check
    clear [--arch ARCH]    remove all entries (of one architecture), with Triton's binaries
    prune [--max-size S]   evict least recently used entries until the cache fits S (default 2GiB)

``--cache-dir DIR`` picks the cache like the ``cache_dir`` option does; without it,
$COMPILE_BACKEND_CACHE_DIR, then $XDG_CACHE_HOME/compile_backend or ~/.cache/compile_backend.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from typing import Dict, List, Optional, Sequence, TextIO

from . import entry as entry_format
from . import location, trust
from .store import DEFAULT_MAX_BYTES, EngineCache, EntryInfo

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def parse_size(text: str) -> int:
    """``2GiB``, ``500M``, ``1.5g``, ``1048576``: binary multiples (K = 1024 bytes)."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GiB, 500M, 1048576)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compile_backend cache",
                                     description="Inspect and tidy the compile_backend engine cache.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=None,
                        help=f"cache directory (default: ${location.CACHE_DIR_ENV}, else {location.default_root()})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[common], help="list entries per architecture")
    info = commands.add_parser("info", parents=[common], help="cache summary, or one entry's manifest")
    info.add_argument("entry", nargs="?", help="entry digest or a unique prefix of it")
    clear = commands.add_parser("clear", parents=[common], help="remove entries")
    clear.add_argument("--arch", default=None, help="only this architecture (e.g. sm90, cpu, interp)")
    prune = commands.add_parser("prune", parents=[common], help="evict least recently used entries")
    prune.add_argument("--max-size", type=parse_size, default=DEFAULT_MAX_BYTES,
                       help="size to prune to, e.g. 2GiB or 500M (default 2GiB)")
    return parser


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    """Entry point for ``python -m compile_backend cache ...``; returns the exit status."""
    out = out or sys.stdout
    args = _parser().parse_args(list(argv) if argv is not None else None)
    cache = EngineCache(args.cache_dir)
    command = {"list": _list, "info": _info, "clear": _clear, "prune": _prune}[args.command]
    return command(cache, args, out)


def _per_arch(infos: List[EntryInfo]) -> Dict[str, Dict[str, int]]:
    totals: Dict[str, Dict[str, int]] = {}
    for info in infos:
        row = totals.setdefault(info.arch, {"entries": 0, "bytes": 0, "hits": 0})
        row["entries"] += 1
        row["bytes"] += info.size
        row["hits"] += info.hits
    return totals


def _list(cache: EngineCache, args: argparse.Namespace, out: TextIO) -> int:
    infos = cache.entries()
    print(f"cache: {cache.root}", file=out)
    if not infos:
        print("no entries", file=out)
        return 0
    header = f"{'ARCH':<8} {'TOOLCHAIN':<40} {'ENTRY':<16} {'SIZE':>10} {'HITS':>6}  LAST USED"
    print(header, file=out)
    for info in sorted(infos, key=lambda i: (i.arch, i.toolchain, -i.last_used)):
        note = "" if info.readable else "  (manifest unreadable)"
        print(f"{info.arch:<8} {info.toolchain:<40} {info.digest[:16]:<16} {format_size(info.size):>10} "
              f"{info.hits:>6}  {_when(info.last_used)}{note}", file=out)
    print("", file=out)
    for arch, row in sorted(_per_arch(infos).items()):
        print(f"{arch}: {row['entries']} entries, {format_size(row['bytes'])}, {row['hits']} hits", file=out)
    total = sum(info.size for info in infos)
    print(f"total: {len(infos)} entries, {format_size(total)} (cap {format_size(cache.max_bytes)})", file=out)
    return 0


def _info(cache: EngineCache, args: argparse.Namespace, out: TextIO) -> int:
    infos = cache.entries()
    if args.entry:
        return _entry_info(infos, args.entry, out)
    total = sum(info.size for info in infos)
    print(f"cache dir: {cache.root}", file=out)
    print(f"  chosen by: --cache-dir / cache_dir option, else ${location.CACHE_DIR_ENV}, "
          f"else {location.default_root()}", file=out)
    try:
        trusted = trust.check_directory(cache.root, follow=True)
        print(f"  status: {'ok' if trusted else 'does not exist yet'}", file=out)
    except trust.Untrusted as problem:
        print(f"  status: NOT USED ({problem})", file=out)
    print(f"entries: {len(infos)}, {format_size(total)} of {format_size(cache.max_bytes)} cap", file=out)
    for arch, row in sorted(_per_arch(infos).items()):
        print(f"  {arch}: {row['entries']} entries, {format_size(row['bytes'])}, {row['hits']} hits", file=out)
    for arch_dir in sorted(p for p in cache.root.glob("*/*/triton") if p.is_dir()):
        size = sum(f.stat().st_size for f in arch_dir.rglob("*") if f.is_file() and not f.is_symlink())
        print(f"triton binaries {arch_dir.relative_to(cache.root)}: {format_size(size)}", file=out)
    return 0


def _entry_info(infos: List[EntryInfo], prefix: str, out: TextIO) -> int:
    matches = [info for info in infos if info.digest.startswith(prefix.lower())]
    if len(matches) != 1:
        problem = "no entry" if not matches else f"{len(matches)} entries"
        print(f"{problem} matches {prefix!r}", file=out)
        return 1
    info = matches[0]
    print(f"entry: {info.path}", file=out)
    try:
        entry = entry_format.load_entry(info.path, None)
    except trust.Untrusted as problem:
        print(f"integrity: FAILED ({problem})", file=out)
        return 1
    manifest = entry.manifest
    print("integrity: ok (every checksum matches)", file=out)
    print(f"arch: {manifest.get('arch')}  gpu: {manifest.get('gpu_name')}", file=out)
    print(f"versions: {json.dumps(manifest.get('versions'), sort_keys=True)}", file=out)
    print(f"created: {_when(manifest.get('created', 0))}  last used: {_when(manifest.get('last_used', 0))}  "
          f"hits: {manifest.get('hits', 0)}", file=out)
    print(f"size: {format_size(manifest.get('sizes', {}).get('total', info.size))}", file=out)
    for name, size in sorted(manifest.get("sizes", {}).get("files", {}).items()):
        print(f"  {name}: {format_size(size)}", file=out)
    for name, desc in sorted(manifest.get("tensors", {}).items()):
        print(f"  tensor {name}: {desc.get('dtype')} {desc.get('shape')}", file=out)
    key = manifest.get("key", {})
    print(f"options: {json.dumps(key.get('options'), sort_keys=True)}", file=out)
    print(f"inputs: {json.dumps(key.get('inputs'))}", file=out)
    print(f"calibration: {key.get('calibration_hash')}", file=out)
    print(f"meta: {json.dumps(manifest.get('meta'), sort_keys=True)}", file=out)
    graph_lines = str(key.get("graph", "")).splitlines()
    print(f"graph (sha256 {key.get('graph_sha256', '?')[:16]}, {len(graph_lines)} lines):", file=out)
    for line in graph_lines[:40]:
        print(f"  {line}", file=out)
    if len(graph_lines) > 40:
        print(f"  ... {len(graph_lines) - 40} more lines", file=out)
    return 0


def _clear(cache: EngineCache, args: argparse.Namespace, out: TextIO) -> int:
    removed = cache.clear(arch=args.arch)
    scope = f" for {args.arch}" if args.arch else ""
    print(f"removed {removed} entries{scope} from {cache.root}", file=out)
    return 0


def _prune(cache: EngineCache, args: argparse.Namespace, out: TextIO) -> int:
    evicted = cache.prune(args.max_size)
    freed = sum(info.size for info in evicted)
    print(f"evicted {len(evicted)} entries, freed {format_size(freed)}; "
          f"now {format_size(cache.total_bytes())} (cap {format_size(args.max_size)})", file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
