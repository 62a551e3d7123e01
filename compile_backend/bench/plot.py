"""Plot benchmark records: latency (median, p20-p80 bars) and speedup vs eager, per model and peer.

    python -m compile_backend.bench.plot results.json plot.png
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

PEER_ORDER = ("eager", "inductor", "inductor-reduce-overhead", "inductor-max-autotune", "compile_backend")


def _case(r: dict) -> str:
    return f"{r['model']}/{r.get('size')}\nb{r.get('batch')} {r.get('precision')}"


def _latest(records: Sequence[dict]) -> Dict[Tuple[str, str], dict]:
    """One record per (case, backend): the last successful one (files accumulate runs)."""
    chosen: Dict[Tuple[str, str], dict] = {}
    for r in records:
        if r.get("error") or r.get("median_ms") is None:
            continue
        chosen[(_case(r), r["backend"])] = r
    return chosen


def plot_records(records: Sequence[dict], path: str, title: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on benchmark machines
    import matplotlib.pyplot as plt

    chosen = _latest(records)
    cases: List[str] = list(dict.fromkeys(case for case, _ in chosen))
    peers = [p for p in PEER_ORDER if any(b == p for _, b in chosen)]
    peers += sorted({b for _, b in chosen} - set(peers))
    fig, (ax_lat, ax_speed) = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(cases) * max(1, len(peers)) / 3), 8))
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        xs, lat, err_lo, err_hi, speed_x, speed = [], [], [], [], [], []
        for j, case in enumerate(cases):
            r = chosen.get((case, peer))
            if r is None:
                continue
            x = j + (i - (len(peers) - 1) / 2) * width
            xs.append(x)
            lat.append(r["median_ms"])
            err_lo.append(max(0.0, r["median_ms"] - r.get("p20_ms", r["median_ms"])))
            err_hi.append(max(0.0, r.get("p80_ms", r["median_ms"]) - r["median_ms"]))
            eager = chosen.get((case, "eager"))
            if eager is not None:
                speed_x.append(x)
                speed.append(eager["median_ms"] / r["median_ms"])
        ax_lat.bar(xs, lat, width, yerr=[err_lo, err_hi], capsize=2, label=peer)
        ax_speed.bar(speed_x, speed, width, label=peer)
        for x, v in zip(speed_x, speed):
            ax_speed.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    for ax in (ax_lat, ax_speed):
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax_lat.set_ylabel("median latency (ms), p20-p80")
    ax_lat.set_yscale("log")
    ax_speed.set_ylabel("speedup vs eager (x)")
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_lat.legend(fontsize=8)
    devices = sorted({r.get("device", "?") for r in chosen.values()})
    ax_lat.set_title(title or "compile_backend benchmarks: " + ", ".join(devices), fontsize=10)
    if not chosen:
        ax_lat.text(0.5, 0.5, "no successful records", ha="center", transform=ax_lat.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m compile_backend.bench.plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        data = json.load(f)
    plot_records(data["records"] if isinstance(data, dict) else data, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
