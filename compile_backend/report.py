"""Report: what the backend did to each graph (passes, kernels, fallbacks, cache)."""
from __future__ import annotations

import dataclasses
import html
import platform
from typing import Any, Dict, List, Optional

import torch

#: the header line of a report whose graphs could not use generated kernels
NO_GENERATED_KERNELS = (
    "note: Triton kernels run only on CUDA (or on a CPU under TRITON_INTERPRET=1, Triton's "
    "interpreter, slowly); on this device every group runs its ATen implementation "
    "(impl aten) and the engine cache is off")


@dataclasses.dataclass
class GraphReport:
    name: str
    role: str  # inference | forward | backward
    passes: Dict[str, int] = dataclasses.field(default_factory=dict)
    # per-rule matches of the passes made of rules: {pass: {rule: count}}
    rules: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)
    # quantization, per layer: name, kind, k, n, precision, weights, activations, calibrator,
    # amax, sqnr_db (vs float on the calibration data), status (quantized | float), reason
    quant: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    # kernels that only quantize an activation (quant/standalone.py): {"kernel": index, "reason"}
    standalone_quantizes: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    # training graphs with QAT fake quantization (quant/qat_report.py): {"ops", "kernels": {kind:
    # count}, "aten": groups in ATen}; None otherwise
    fake_quant: Optional[Dict[str, Any]] = None
    kernels: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    fallbacks: List[Dict[str, str]] = dataclasses.field(default_factory=list)
    shapes: List[str] = dataclasses.field(default_factory=list)
    compile_s: float = 0.0
    cuda_graph: bool = False
    # declared dynamic dimensions bound to this graph: per profile its range, buckets, the
    # buckets built, status (active | rejected | not applied) and reason
    profiles: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    # engine cache for this graph: {"engine": hit | miss | off | bypass, "key", "stored", "bypasses"}
    cache: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # memory plan of the engine: {"arena_bytes", "planned_peak_bytes", "eager_peak_bytes",
    # "planned_buffers"}; peaks count intermediates and outputs, not inputs or weights
    memory: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # the tuner's counters for this graph's build (kernels.autotune.Tuner.stats): {"tuned",
    # "from_cache", "heuristic", "candidates_timed", "seconds"}; empty when no kernel was tuned
    tuning: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # inputs the graph writes (a KV cache's update): {"input": argument index, "by": "kernel"
    # (written in place by kernel ``kernel``, input_writes.py) | "aten in place" (kernel ``kernel``'s
    # ATen op in its in-place form: index_copy_) | "copy_" (an ATen copy after the fact)}
    input_writes: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    # first-call speed check (CUDA inference, compile_backend.speed_check): {"ms": {runner: median
    # ms}, "chosen": runner, "from_cache": True when an earlier process's verdict was applied}; empty when it did not run
    speed_check: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # where the first call's compile_s went, seconds: "passes" (the fx passes, a quantized
    # engine's layer speed probes included), "probes" (those probes: the probe tuner's counters,
    # Tuner.stats, with its "seconds" timing and "precompile_seconds" compiling ahead), "kernels"
    # (building every group's kernel: tuning, compiling, checking), "speed_check"; empty on a cache hit's
    # skipped stages
    stages: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def stage_line(self) -> str:
        """Where the first call's seconds went: ``passes 3.1s (probes: 24 tuned in 9.8s, 12.1s
        compiling ahead), kernels 30.2s (40 tuned in 21.0s, 8.0s compiling ahead), speed check
        0.8s``."""
        parts = []
        probes = self.stages.get("probes") or {}
        if "passes" in self.stages:
            extra = (f" (probes: {probes.get('tuned', 0)} tuned in {probes.get('seconds', 0.0):.1f}s, "
                     f"{probes.get('precompile_seconds', 0.0):.1f}s compiling ahead)") if probes else ""
            parts.append(f"passes {self.stages['passes']:.1f}s{extra}")
        if "kernels" in self.stages:
            ahead = self.tuning.get("precompile_seconds", 0.0)
            ahead = f", {ahead:.1f}s compiling ahead" if ahead else ""
            tuned = (f" ({self.tuning.get('tuned', 0)} tuned in {self.tuning.get('seconds', 0.0):.1f}s{ahead})"
                     if self.tuning.get("tuned") else "")
            parts.append(f"kernels {self.stages['kernels']:.1f}s{tuned}")
        if "speed_check" in self.stages:
            parts.append(f"speed check {self.stages['speed_check']:.1f}s")
        return ", ".join(parts)

    def fired(self) -> str:
        """Passes that fired, each with its rules that did: ``fold_batchnorm=53
        (fold_batchnorm.conv_bn: 53)``."""
        parts = []
        for name, n in self.passes.items():
            if not n:
                continue
            per_rule = [f"{name}.{rule}: {c}" for rule, c in self.rules.get(name, {}).items() if c]
            parts.append(f"{name}={n}" + (f" ({', '.join(per_rule)})" if per_rule else ""))
        return ", ".join(parts) or "none fired"

    def groups_by_kind(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for k in self.kernels:
            out[k["kind"]] = out.get(k["kind"], 0) + 1
        return out

    def slower_than_reference(self) -> List[Dict[str, Any]]:
        """Kernels the tuner timed slower than their reference (the float GEMM/conv that a
        quantized layer replaces): kernel index, its ops, both times."""
        out = []
        for i, k in enumerate(self.kernels):
            c = k.get("config") or {}
            if "reference_ms" in c and "tuned_ms" in c and c["tuned_ms"] > c["reference_ms"]:
                out.append({"kernel": i, "ops": list(dict.fromkeys(k["ops"])), "ms": c["tuned_ms"],
                            "reference": c["reference"], "reference_ms": c["reference_ms"]})
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["groups"] = self.groups_by_kind()
        d["slower_than_reference"] = self.slower_than_reference()
        return d


@dataclasses.dataclass
class Report:
    graphs: List[GraphReport] = dataclasses.field(default_factory=list)
    cache: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"hits": 0, "misses": 0, "bypasses": [], "dir": None})
    device: str = ""
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: Dict[str, str] = dataclasses.field(default_factory=dict)
    # whether generated (Triton) kernels can run on the device: on CUDA, or on a CPU under
    # Triton's interpreter (TRITON_INTERPRET=1); None until the backend has seen an input
    generated_kernels: Optional[bool] = None

    def new_graph(self, name: str, role: str) -> GraphReport:
        g = GraphReport(name=name, role=role)
        self.graphs.append(g)
        return g

    def to_dict(self) -> dict:
        return {
            "graphs": [g.to_dict() for g in self.graphs],
            "cache": self.cache_summary(),
            "device": self.device,
            "options": dict(self.options),
            "versions": dict(self.versions),
            "generated_kernels": self.generated_kernels,
        }

    def cache_summary(self) -> Dict[str, Any]:
        """Engine-cache hits, misses and bypasses (with their reasons) over every graph built,
        plus the tuned choices that came from the timing cache."""
        states = [g.cache.get("engine") for g in self.graphs if g.cache]
        bypasses: Dict[tuple, Dict[str, Any]] = {}
        for g in self.graphs:
            for b in g.cache.get("bypasses", []):
                bypasses[(b.get("reason"), b.get("path"))] = b
            if g.cache.get("engine") == "bypass":
                bypasses[(g.cache.get("reason"), g.name)] = {"reason": g.cache.get("reason"), "path": g.name}
        return {**self.cache, "hits": states.count("hit"), "misses": states.count("miss"),
                "bypasses": list(bypasses.values()), "timing_hits": self.timing_hits()}

    def timing_hits(self) -> int:
        """Kernels whose tuned choice came from the on-disk timing cache (no tuning this run)."""
        return sum(1 for g in self.graphs for k in g.kernels if k.get("tuned_from_cache"))

    # ----------------------------------------------------------------- rendering
    def __str__(self) -> str:
        lines = [f"compile_backend report  device: {self.device}  versions: "
                 + ", ".join(f"{k} {v}" for k, v in self.versions.items())]
        if self.generated_kernels is False:
            lines.append(NO_GENERATED_KERNELS)
        for g in self.graphs:
            lines.append("")
            lines.append(f"== {g.name} ({g.role})  shapes: {'; '.join(g.shapes) or '-'}  compile {g.compile_s:.2f}s"
                         + ("  cuda graph" if g.cuda_graph else "")
                         + (f"  engine cache {g.cache['engine']}" if g.cache.get("engine") else ""))
            if g.stages:
                lines.append("compile: " + g.stage_line())
            lines.append("passes: " + g.fired())
            lines.append("groups: " + (", ".join(f"{k}={v}" for k, v in sorted(g.groups_by_kind().items())) or "none"))
            if g.memory:
                m = g.memory
                lines.append(f"memory: planned peak {_mib(m['planned_peak_bytes'])} (arena {_mib(m['arena_bytes'])}, "
                             f"{m['planned_buffers']} buffers) vs eager {_mib(m['eager_peak_bytes'])}")
            rows = [("#", "kind", "impl", "ops", "config")]
            for i, k in enumerate(g.kernels):
                ops = ", ".join(dict.fromkeys(k["ops"]))
                rows.append((str(i), k["kind"], k["impl"], _cut(ops, 60), _cut(_cfg(k.get("config")), 40)))
            lines.extend(_table(rows))
            for f in g.fallbacks:
                lines.append(f"fallback: {f['op']}: {f['reason']}")
            lines.extend(_profile_line(p) for p in g.profiles)
            lines.extend(quant_lines(g.quant))
            for q in g.standalone_quantizes:
                lines.append(f"standalone quantize: kernel #{q['kernel']}: {q['reason']}")
            if g.input_writes:
                n = {how: sum(w["by"] == how for w in g.input_writes) for how in ("kernel", "aten in place", "copy_")}
                lines.append(f"inputs written: {len(g.input_writes)} ({n['kernel']} in place by the kernel making "
                             f"the value, {n['aten in place']} by an ATen op in place, {n['copy_']} by an ATen copy_)")
            if g.fake_quant:
                f = g.fake_quant
                kinds = ", ".join(f"{k} {v}" for k, v in f["kernels"].items()) or "none"
                lines.append(f"fake-quant (QAT): {f['ops']} ops in {sum(f['kernels'].values())} kernels of ours "
                             f"({kinds}), {f['aten']} groups in ATen")
            if g.speed_check:
                times = ", ".join(f"{k} {v:.4f} ms" for k, v in g.speed_check["ms"].items())
                stored = " (the stored verdict of an earlier process)" if g.speed_check.get("from_cache") else ""
                lines.append(f"speed check: {times}; running the {g.speed_check['chosen']}{stored}")
            for r in g.slower_than_reference():
                lines.append(f"slower than float: kernel #{r['kernel']} ({_cut(', '.join(r['ops']), 40)}) "
                             f"{r['ms']:.4f} ms vs {r['reference']} {r['reference_ms']:.4f} ms")
        c = self.cache_summary()
        lines.append("")
        if self.graphs and all(g.cache.get("engine") == "off" for g in self.graphs):
            lines.append("cache: engine cache off (no generated kernels on this device, nothing to store)")
            return "\n".join(lines)
        lines.append(f"cache: dir {c.get('dir')}; engines: {c['hits']} hits, {c['misses']} misses; "
                     f"tuned choices from the timing cache: {c['timing_hits']}")
        for b in c["bypasses"]:
            lines.append(f"cache bypass: {b.get('reason')}: {b.get('path')}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        parts = [f"<h4>compile_backend report</h4><p>device: {html.escape(self.device)}</p>"]
        if self.generated_kernels is False:
            parts.append(f"<p>{html.escape(NO_GENERATED_KERNELS)}</p>")
        for g in self.graphs:
            parts.append(f"<h5>{html.escape(g.name)} ({g.role})</h5>")
            parts.append(f"<p>passes: {html.escape(g.fired())}</p>")
            parts.append("<table><tr><th>#</th><th>kind</th><th>impl</th><th>ops</th><th>config</th></tr>")
            for i, k in enumerate(g.kernels):
                ops = ", ".join(dict.fromkeys(k["ops"]))
                parts.append(
                    f"<tr><td>{i}</td><td>{k['kind']}</td><td>{k['impl']}</td>"
                    f"<td>{html.escape(ops)}</td><td>{html.escape(_cfg(k.get('config')))}</td></tr>"
                )
            parts.append("</table>")
            if g.fallbacks:
                parts.append("<ul>" + "".join(
                    f"<li>{html.escape(f['op'])}: {html.escape(f['reason'])}</li>" for f in g.fallbacks) + "</ul>")
            parts.extend(f"<p>{html.escape(_profile_line(p))}</p>" for p in g.profiles)
        return "".join(parts)


def versions() -> Dict[str, str]:
    from . import __version__

    out = {"torch": torch.__version__, "compile_backend": __version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        out["triton"] = version("triton")
    except Exception:
        out["triton"] = "absent"
    return out


def device_name(device: Optional[torch.device] = None) -> str:
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        idx = device.index if device is not None and device.index is not None else 0
        cap = torch.cuda.get_device_capability(idx)
        return f"{torch.cuda.get_device_name(idx)} (sm{cap[0]}{cap[1]})"
    return f"cpu ({platform.machine()})"


def quant_lines(layers: List[Dict[str, Any]]) -> List[str]:
    """The quantization table of one graph: a summary line, then a row per layer."""
    if not layers:
        return []
    done = [q for q in layers if q["status"] == "quantized"]
    lines = [f"quantized: {len(done)} of {len(layers)} GEMM/conv layers"]
    rows = [("layer", "kind", "precision", "weights", "activations", "calibrator", "sqnr dB", "status")]
    for q in layers:
        sqnr = q.get("sqnr_db")
        rows.append((_cut(q["name"], 48), q["kind"], q["precision"] if q["status"] == "quantized" else "float",
                     q["weights"], q["activations"], q.get("calibrator") or "-",
                     "-" if sqnr is None else f"{sqnr:.1f}",
                     "quantized" if q["status"] == "quantized" else _cut(q["reason"], 60)))
    return lines + _table(rows)


def _profile_line(p: Dict[str, Any]) -> str:
    line = (f"profile input {p['input']} dim {p['dim']} [{p['min']}..{p['max']}, opt {p['opt']}]: "
            f"{p['status']}; buckets {','.join(map(str, p['buckets']))}; "
            f"built {','.join(map(str, p['built'])) or 'none'}")
    return line + (f"; {p['reason']}" if p.get("reason") else "")


def _cfg(config: Any) -> str:
    if not config:
        return ""
    return " ".join(f"{k}={v}" for k, v in config.items())


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 // 10 else f"{n / 2**10:.1f} KiB"


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _table(rows) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
