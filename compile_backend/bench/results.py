"""Where records go: the environment they record, the results file, ratios and the table."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from typing import Any, Dict, List, Optional

import torch

from .peers import UsageError

#: the directory holding the compile_backend package: the repository root in a checkout (or an
#: editable install), site-packages when installed
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def environment(device: str, device_name: Optional[str] = None, commit: Optional[str] = None) -> Dict[str, Any]:
    """Versions, commit, date and the device's name (``device_name`` skips asking CUDA;
    ``commit`` names the commit where the tree has no ``.git``, as on the GPU machine)."""
    from importlib import metadata

    triton_version = None
    for dist in ("triton", "pytorch-triton"):
        try:
            triton_version = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    if device_name is not None:
        name = device_name
    elif device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "commit": commit or git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def git_commit() -> str:
    """HEAD of the checkout this package runs from, or "unknown" (an installed package, no git,
    no commits): a package in site-packages must not report the commit of a repository it
    happens to sit in (a virtual environment inside a checkout)."""
    if not os.path.exists(os.path.join(SOURCE_ROOT, ".git")):  # a file in a git worktree
        return "unknown"
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE_ROOT, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # a repository without commits prints "HEAD" and fails: only accept a real hash
    if proc.returncode == 0 and all(c in "0123456789abcdef" for c in proc.stdout.strip()):
        return proc.stdout.strip() or "unknown"
    return "unknown"


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ResultsFile:
    """A JSON list of records; this run's records are appended to what was there."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.existing: List[dict] = []
        if path and os.path.exists(path) and os.path.getsize(path) > 0:
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError) as exc:
                raise UsageError(f"--out {path}: cannot read it as JSON ({exc}); "
                                 "give a new file or a results file of this tool") from None
            self.existing = data.get("records") if isinstance(data, dict) else data
            if not isinstance(self.existing, list):
                raise UsageError(f"--out {path} does not hold a list of benchmark records; "
                                 "give a new file or a results file of this tool")

    def write(self, records: List[dict]) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(_clean(self.existing + records), f, indent=1, allow_nan=False)
        os.replace(tmp, self.path)


def add_ratios(records: List[dict]) -> None:
    """``ratio_vs_best`` (median / best median) and ``speedup_vs_eager`` within one run."""
    ok = [r for r in records if r.get("median_ms")]
    if not ok:
        return
    best = min(r["median_ms"] for r in ok)
    eager = next((r["median_ms"] for r in ok if r["backend"] == "eager"), None)
    for r in ok:
        r["ratio_vs_best"] = r["median_ms"] / best
        r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None


def format_table(records: List[dict]) -> str:
    def num(v, fmt, suffix=""):
        return "-" if v is None else format(v, fmt) + suffix

    head = ("backend", "median ms", "p20-p80 ms", "vs best", "vs eager", "compile s", "warm s",
            "peak MB", "max abs", "cosine", "top1")
    rows = [head]
    for r in records:
        if "error" in r:
            rows.append((r["backend"], "ERROR: " + (r["error"].splitlines() or [""])[0][:90]) + ("",) * 9)
            continue
        a = r.get("accuracy") or {}
        rows.append((
            r["backend"], num(r["median_ms"], ".3f"), f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            num(r.get("ratio_vs_best"), ".2f", "x"), num(r.get("speedup_vs_eager"), ".2f", "x"),
            num(r.get("compile_s"), ".1f"), num(r.get("warm_compile_s"), ".1f"),
            num(r.get("peak_mem_mb"), ".0f"), num(a.get("max_abs"), ".2e"), num(a.get("cosine"), ".6f"),
            num(a.get("top1"), ".3f"),
        ))
    widths = [max(len(row[i]) for row in rows if not row[1].startswith("ERROR") or i == 0)
              for i in range(len(head))]
    lines = []
    for row in rows:
        if row[1].startswith("ERROR"):
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
