"""Issue #18's verdicts from quantized-suite results: per case, each quantized engine's latency
over the best FP16 peer, against the issue's targets; a markdown table (for the README and the
closing note) and a plot.

    python -m benchmarks.quant_table benchmarks/results/quant_suite_h200.json \
        [more.json: e.g. Inductor max-autotune, run in its own process] \
        --markdown benchmarks/results/quant_suite_h200.md --plot benchmarks/results/quant_suite_h200.png

Best FP16 peer: the fastest of eager, Inductor default, reduce-overhead, max-autotune (records
from ``benchmarks.suite`` with backend ``inductor-max-autotune`` count when given) and our FP16
engine (``compile_backend``), per case. Each quantized record (ours: ``cb-<precision>-<mode>``;
torchao's) gets ``ratio`` = its median / the best FP16 peer's, ``vs_ours_fp16``, and for our
static engines the target and a verdict. Dynamic engines are compared with torchao's of the
same precision where that ran. The latest successful record per (case, backend) counts (files
accumulate runs).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

FP16_PEERS = ("eager", "inductor", "inductor-reduce-overhead", "inductor-max-autotune", "compile_backend",
              "compile_backend-pdl")
OURS = ("cb-fp8-static", "cb-int8-static", "cb-fp8-dynamic", "cb-int8-dynamic", "cb-fp8-static-tensor")
TORCHAO_TWIN = {"cb-fp8-dynamic": "torchao-fp8-dyn", "cb-int8-dynamic": "torchao-int8-dyn"}
#: issue #18's targets (quantized static / best FP16 peer), by model family and precision
TARGETS = {("mlp", "fp8"): 0.65, ("mlp", "int8"): 0.75,
           ("transformer", "fp8"): 0.80, ("transformer", "int8"): 0.90,
           ("resnet50_b32", "fp8"): 0.85, ("resnet50_b32", "int8"): 0.85}


def is_ours(backend: str) -> bool:
    """One of our quantized engines: ``cb-<precision>-<mode>`` and its variants
    (``-tensor``: per-tensor weight scales, ``-fast``: FP8 fast accumulation, ``-codes``:
    residual adds reading 8-bit codes, ``-pdl``: Programmatic Dependent Launch) get the targets."""
    parts = backend.split("-")
    return "-".join(parts[:3]) in OURS and set(parts[3:]) <= {"tensor", "fast", "codes", "pdl"}


def family(model: str, batch: int) -> Optional[str]:
    if model == "mlp":
        return "mlp"
    if "resnet50" in model:
        return "resnet50_b32" if batch >= 32 else None  # batch 1 is reported, not targeted
    if any(k in model for k in ("bert", "gpt2", "vit")):
        return "transformer"
    return None


def case_of(r: dict) -> Optional[str]:
    """``model:batch``: the quantized suite's ``case``, or made from a ``benchmarks.suite``
    record (its model is a ``module:function`` spec or a zoo name)."""
    if "case" in r:
        return r["case"]
    if "model" in r and r.get("batch") is not None:
        return f"{str(r['model']).split(':')[-1]}:{r['batch']}"
    return None


def latest(records: Sequence[dict]) -> Dict[Tuple[str, str], dict]:
    chosen: Dict[Tuple[str, str], dict] = {}
    for r in records:
        case = case_of(r)
        if r.get("error") or r.get("median_ms") is None or case is None or "backend" not in r:
            continue
        chosen[(case, r["backend"])] = r
    return chosen


def verdicts(records: Sequence[dict]) -> List[dict]:
    """One row per (case, quantized backend) with its ratios, target and verdict."""
    chosen = latest(records)
    cases = list(dict.fromkeys(case for case, _ in chosen))
    rows = []
    for case in cases:
        fp16 = {p: chosen[(case, p)]["median_ms"] for p in FP16_PEERS if (case, p) in chosen}
        if not fp16:
            continue
        best_peer = min(fp16, key=fp16.get)
        for backend in [b for c, b in chosen if c == case and b not in FP16_PEERS]:
            r = chosen[(case, backend)]
            # a -pdl engine against our FP16 engine launched the same way, where that ran
            ours = "compile_backend-pdl" if backend.endswith("-pdl") and "compile_backend-pdl" in fp16 else "compile_backend"
            row = {"case": case, "backend": backend, "ms": r["median_ms"], "best_fp16_peer": best_peer,
                   "best_fp16_ms": fp16[best_peer], "ratio": r["median_ms"] / fp16[best_peer],
                   "vs_ours_fp16": r["median_ms"] / fp16[ours] if ours in fp16 else None,
                   "cosine": (r.get("accuracy") or {}).get("cosine")}
            if is_ours(backend):
                precision, mode = backend.split("-")[1:3]
                fam = family(r.get("model", case.split(":")[0]), int(r.get("batch", case.rsplit(":", 1)[-1])))
                target = TARGETS.get((fam, precision)) if mode == "static" else None
                row["target"] = target
                row["meets_target"] = None if target is None else row["ratio"] <= target
                row["not_slower_than_ours_fp16"] = None if row["vs_ours_fp16"] is None else row["vs_ours_fp16"] <= 1.0
                twin = TORCHAO_TWIN.get(backend.removesuffix("-pdl").removesuffix("-fast"))  # not the mode
                if twin and (case, twin) in chosen:
                    row["vs_torchao"] = r["median_ms"] / chosen[(case, twin)]["median_ms"]
            rows.append(row)
    return rows


def markdown(rows: Sequence[dict]) -> str:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    out = ["| case | engine | ms | best FP16 peer (ms) | ratio | target | vs our FP16 | vs torchao | cosine |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "" if r.get("meets_target") is None else (" ok" if r["meets_target"] else " **miss**")
        out.append(f"| {r['case']} | {r['backend']} | {f(r['ms'])} | {r['best_fp16_peer']} ({f(r['best_fp16_ms'])}) "
                   f"| {f(r['ratio'], '{:.2f}x')} | {f(r.get('target'), '<= {:.2f}x')}{verdict} "
                   f"| {f(r['vs_ours_fp16'], '{:.2f}x')} | {f(r.get('vs_torchao'), '{:.2f}x')} "
                   f"| {f(r['cosine'], '{:.4f}')} |")
    return "\n".join(out) + "\n"


def plot(rows: Sequence[dict], path: str, title: str = "quantized engines / best FP16 peer") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    width = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(cases) * max(1, len(backends)) / 3), 4.5))
    for i, backend in enumerate(backends):
        xs, ys = [], []
        for j, case in enumerate(cases):
            r = next((r for r in rows if r["case"] == case and r["backend"] == backend), None)
            if r is not None:
                xs.append(j + (i - (len(backends) - 1) / 2) * width)
                ys.append(r["ratio"])
                if r.get("target"):
                    ax.hlines(r["target"], xs[-1] - width / 2, xs[-1] + width / 2, colors="k", linewidth=1)
        ax.bar(xs, ys, width, label=backend)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)
    ax.set_ylabel("latency / best FP16 peer (lower is better; black: target)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(paths: Sequence[str]) -> List[dict]:
    records: List[dict] = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        records += data.get("records", []) if isinstance(data, dict) else data
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_table", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    rows = verdicts(load(args.results))
    text = markdown(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.plot and rows:
        try:
            plot(rows, args.plot)
        except ImportError as exc:  # matplotlib absent (a GPU image without it): the table stands
            print(f"[quant_table] no plot: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
