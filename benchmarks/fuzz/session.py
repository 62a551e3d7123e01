"""A fuzz session: many cases, failures minimised and grouped by signature, a summary.

Case ``i`` of a session with seed ``s`` is program ``case_seed(s, i)`` run in mode and validate
setting number ``i`` of the round robin over the requested ones, so any case can be rerun alone
(``--only-seed``). Cases tagged ``dropout`` are counted apart: random ops get the same seed in
eager and compiled, and whether the compiled call draws the same numbers is its own question.

Minimising costs one compile per attempt, so a failure is minimised only when no earlier
minimised repro of the same class and message explains it (its op kinds all occur in this
program), and at most ``minimize`` times per session.
"""
from __future__ import annotations

import collections
import os
import tempfile
import time
from typing import Dict, Iterable, List, Optional

from .graphs import generate
from .minimize import minimize as shrink_case, repro_script
from .program import FLOAT_NAMES, describe
from .runner import Result, run_case

FAILING = ("wrong", "crash", "upstream", "fallback")


def case_seed(seed: int, i: int) -> int:
    return seed * 100003 + i


def ensure_cache_dir() -> None:
    """Engines go to a throwaway cache: a stale entry must not hide (or cause) a failure."""
    os.environ.setdefault("COMPILE_BACKEND_CACHE_DIR", tempfile.mkdtemp(prefix="cb-fuzz-cache-"))


def run_session(seeds: Iterable[int], modes: List[str], validates: List[bool], *, minimize: int = 20,
                max_attempts: int = 60, log=print, progress_every: int = 25) -> Dict:
    ensure_cache_dir()
    start = time.perf_counter()
    counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    dropout: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    groups: Dict[str, Dict] = {}
    failures: List[Dict] = []
    minimized: List[Dict] = []
    seeds = list(seeds)
    for i, s in enumerate(seeds):
        mode = modes[i % len(modes)]
        validate = validates[(i // len(modes)) % len(validates)]
        program = generate(s)
        res = run_case(program, mode, validate)
        table = dropout if "dropout" in program.tags else counts
        table[mode][res.cls] += 1
        if res.cls in FAILING:
            entry = {"seed": s, "mode": mode, "validate": validate, "cls": res.cls, "signature": res.signature,
                     "message": res.message, "program": describe(program), "dropout": "dropout" in program.tags}
            group = _explained(minimized, res, program)
            if group is None and len(minimized) < minimize and res.cls != "fallback":
                small = shrink_case(program, mode, validate, res, max_attempts=max_attempts)
                small_res = run_case(small, mode, validate)
                if small_res.cls != res.cls:  # flaky failure: keep the original
                    small, small_res = program, res
                tags = sorted(small.tags - {"nonfinite"})
                sig = f"{res.signature} | ops: {', '.join(small.kinds)}" + (f" | {', '.join(tags)}" if tags else "")
                group = {"signature": sig, "cls": res.cls,
                         "kinds": set(small.kinds), "raw": res.signature, "count": 0, "modes": set(),
                         "first": entry, "repro": repro_script(small, mode, validate, small_res),
                         "dtype": FLOAT_NAMES[small.dtype]}
                minimized.append(group)
                log(f"  new failure [{res.cls}] seed {s} {mode} validate={validate}: {group['signature']}")
            elif group is None:
                key = res.signature
                group = groups.get(key) or {"signature": key, "cls": res.cls, "kinds": None, "raw": key,
                                            "count": 0, "modes": set(), "first": entry, "repro": None}
            groups[group["signature"]] = group
            group["count"] += 1
            group["modes"].add(mode)
            entry["group"] = group["signature"]
            failures.append(entry)
        if progress_every and ((i + 1) % progress_every == 0 or i + 1 == len(seeds)):
            tot = collections.Counter()
            for c in counts.values():
                tot.update(c)
            log(f"[{i + 1:5d}/{len(seeds)}] {time.perf_counter() - start:7.1f}s  " +
                "  ".join(f"{k} {v}" for k, v in sorted(tot.items())))
    return {
        "cases": len(seeds), "seconds": round(time.perf_counter() - start, 1),
        "modes": modes, "validate": validates,
        "counts": {m: dict(c) for m, c in counts.items()},
        "dropout_counts": {m: dict(c) for m, c in dropout.items()},
        "signatures": [{"signature": g["signature"], "class": g["cls"], "count": g["count"],
                        "modes": sorted(g["modes"]), "first_seed": g["first"]["seed"], "first_mode": g["first"]["mode"],
                        "validate": g["first"]["validate"], "message": g["first"]["message"], "repro": g["repro"]}
                       for g in sorted(groups.values(), key=lambda g: (-g["count"], g["signature"]))],
        "failures": failures,
    }


def _explained(minimized: List[Dict], res: Result, program) -> Optional[Dict]:
    kinds = set(program.kinds)
    for g in minimized:
        if g["raw"] == res.signature and g["kinds"] <= kinds:
            return g
    return None


def format_summary(summary: Dict) -> str:
    classes = ["ok", "fallback", "wrong", "crash", "upstream", "eager_error"]
    lines = [f"{summary['cases']} cases in {summary['seconds']} s", ""]
    for title, table in (("cases", summary["counts"]), ("dropout cases (separate)", summary["dropout_counts"])):
        if not table:
            continue
        lines.append(f"{title:26s}" + "".join(f"{c:>12s}" for c in classes))
        for mode in sorted(table):
            lines.append(f"  {mode:24s}" + "".join(f"{table[mode].get(c, 0):12d}" for c in classes))
        lines.append("")
    lines.append(f"{len(summary['signatures'])} distinct failure signatures:")
    for k, g in enumerate(summary["signatures"]):
        lines.append(f"  [{g['count']:3d}x {g['class']:8s} {'/'.join(g['modes'])}] {g['signature']}")
        lines.append(f"        first: seed {g['first_seed']} {g['first_mode']} validate={g['validate']}: {g['message'][:200]}")
    for g in summary["signatures"]:
        if g["repro"]:
            lines += ["", "=" * 100, f"# repro for: {g['signature']}", g["repro"]]
    return "\n".join(lines)
