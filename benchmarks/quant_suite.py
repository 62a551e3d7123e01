"""The quantized suite (issue #18): per model, in one process, every FP16 peer beside our
quantized engines and torchao's, latency and accuracy side by side.

    python -m benchmarks.quant_suite --cases mlp:2048 hf_bert_mask:16 hf_gpt2:8 tv_vit_b_16:32 \
        tv_resnet50:32 tv_resnet50:1 --out $OUT/quant_suite.json

Peers (``--peers``, default all that apply): ``eager``, ``inductor``,
``inductor-reduce-overhead``, ``compile_backend`` (our FP16 engine), ``cb-int8-static``,
``cb-int8-dynamic``, ``cb-fp8-static``, ``cb-fp8-dynamic``, ``cb-fp8-static-tensor`` (per-tensor
weight scales), the FP8 ones again with ``-fast`` (``fp8_accumulation="fast"``) (our quantized engines; static scales
calibrated on four random batches like the case's inputs: random init is fine for speed), and,
where ``torchao`` imports (carry the wheel that matches the GPU image's torch), ``torchao-fp8-dyn``
(``Float8DynamicActivationFloat8WeightConfig``) and ``torchao-int8-dyn``
(``Int8DynamicActivationInt8WeightConfig``), each then compiled with Inductor
``reduce-overhead``; any of ours again with ``-pdl`` (``Options.pdl``: Programmatic Dependent
Launch), asked by name. Inductor max-autotune runs in its own process (``benchmarks.suite``
parts 16-19): its compiles take minutes per model.

Every record: median / p20 / p80 latency of ``--iters`` CUDA-synchronised calls after
``--warmup``, the first call's seconds (compile, calibration excluded and recorded apart: a
cold compile, since session 20: the process is primed with a small model first and each peer
starts without the kernels the one before compiled in memory, ``bench.measure.clean_slate``), and
the output's cosine (and top-1 agreement for logits) against the FP32 eager reference. The file
carries device, torch, Triton and commit (``compile_backend.bench.results.environment``).
``--device cpu --size tiny`` checks the script on the CPU (our engines emulated, no timing worth
quoting).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from compile_backend.bench.measure import (clean_slate, compare, compile_peer, first_and_steady, fresh_compiler_caches,
                                           make_call, prime_process, record_failure, snapshot, strict_fp32, to_device)
from compile_backend.bench.results import ResultsFile, environment

from . import real_models

FP16_PEERS = ("eager", "inductor", "inductor-reduce-overhead", "compile_backend")
OUR_QUANT = {"cb-int8-static": ("int8", "static"), "cb-int8-dynamic": ("int8", "dynamic"),
             "cb-fp8-static": ("fp8", "static"), "cb-fp8-dynamic": ("fp8", "dynamic"),
             # TensorRT's FP8 recipe: one weight scale per tensor, so cuBLAS's tensorwise FP8
             # GEMM serves (rowwise, needed by per-channel weights, ran 1.5x slower at BERT QKV)
             "cb-fp8-static-tensor": ("fp8", "static", "per_tensor"),
             # Options.fp8_accumulation="fast": the tensor cores' accumulator alone (torchao's FP8 setting)
             "cb-fp8-static-fast": ("fp8", "static", "per_channel", "fast"),
             "cb-fp8-static-tensor-fast": ("fp8", "static", "per_tensor", "fast"),
             "cb-fp8-dynamic-fast": ("fp8", "dynamic", "per_channel", "fast"),
             # Options.quant_residuals="quantized": skip connections read the block input's codes
             "cb-int8-static-codes": ("int8", "static", "per_channel", "fp32", "quantized"),
             "cb-fp8-static-tensor-fast-codes": ("fp8", "static", "per_tensor", "fast", "quantized")}
TORCHAO = {"torchao-fp8-dyn": "Float8DynamicActivationFloat8WeightConfig",
           "torchao-int8-dyn": "Int8DynamicActivationInt8WeightConfig"}
ALL_PEERS = FP16_PEERS + tuple(OUR_QUANT) + tuple(TORCHAO)
#: a peer of ours with this suffix: the same engine with ``Options.pdl`` (its generated kernels
#: launched with Programmatic Dependent Launch; -8 to -12% on an H100 decode step, session 24),
#: asked by name only (not in the default list)
PDL_SUFFIX = "-pdl"
KNOWN_PEERS = ALL_PEERS + tuple(p + PDL_SUFFIX for p in ("compile_backend",) + tuple(OUR_QUANT))
CALIBRATION_BATCHES = 4


def log(message: str) -> None:
    print(f"[quant_suite] {message}", file=sys.stderr, flush=True)


def like(t: Any, gen: torch.Generator) -> Any:
    """A fresh batch shaped like ``t`` (calibration data): ids within the same range."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_floating_point():
        return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device, t.dtype)
    high = int(t.max()) + 1 if t.numel() else 1
    return torch.randint(0, max(high, 1), t.shape, generator=gen).to(t.device, t.dtype)


def torchao_model(model: torch.nn.Module, config_name: str) -> torch.nn.Module:
    """A deep copy quantized in place by torchao's ``quantize_`` with ``config_name``."""
    import torchao.quantization as tq

    quantized = copy.deepcopy(model)
    tq.quantize_(quantized, getattr(tq, config_name)())
    return quantized


def build_peer(peer: str, model, inputs, device: str, cache_dir: str, autotune: str, quant_layers: str = "faster",
               compile_processes: Optional[int] = None):
    """(callable, seconds spent preparing: calibration or torchao's quantize_, report or None);
    ``compile_processes``: our engines' option (None: its default)."""
    ours = {} if compile_processes is None else {"compile_processes": compile_processes}
    from compile_backend import quant
    from compile_backend.report import Report

    pdl = peer.endswith(PDL_SUFFIX) and peer in KNOWN_PEERS
    peer = peer.removesuffix(PDL_SUFFIX) if pdl else peer
    if peer in FP16_PEERS:
        report = Report() if peer == "compile_backend" else None
        options = {"cache_dir": cache_dir, "autotune": autotune, "pdl": pdl, **ours} if peer == "compile_backend" else {}
        return compile_peer(peer, model, options, report), 0.0, report
    if peer in OUR_QUANT:
        precision, acts, *rest = OUR_QUANT[peer]
        weights, accumulation, residuals = (list(rest) + ["per_channel", "fp32", "float"][len(rest):])[:3]
        cfg = quant.QuantConfig(precision=precision, activations=acts, weights=weights)
        t0 = time.perf_counter()
        if acts == "static":
            gen = torch.Generator().manual_seed(1)
            batches = [tuple(like(t, gen) for t in inputs) for _ in range(CALIBRATION_BATCHES)]
            cfg = quant.calibrate(model, batches, cfg, progress=False, cache_dir=cache_dir)
        prep = time.perf_counter() - t0
        report = Report()
        options = {"cache_dir": cache_dir, "autotune": autotune, "quant": cfg, "quant_layers": quant_layers,
                   "fp8_accumulation": accumulation, "quant_residuals": residuals, "pdl": pdl, **ours}
        return compile_peer("compile_backend", model, options, report), prep, report
    if peer in TORCHAO:
        t0 = time.perf_counter()
        quantized = torchao_model(model, TORCHAO[peer])
        return torch.compile(quantized, mode="reduce-overhead"), time.perf_counter() - t0, None
    raise ValueError(f"unknown peer {peer!r}; choose among {', '.join(ALL_PEERS)}")


def compile_stages(report) -> Optional[Dict[str, Any]]:
    """Where our engine's first call went, summed over its graphs (``GraphReport.stages``):
    seconds in the passes (with the layer speed probes' own), in building the kernels (with the
    tuner's), in the speed check; None for the other peers."""
    if report is None:
        return None
    out: Dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        out[name] = round(out.get(name, 0.0) + float(value or 0.0), 3)

    def peak(name: str, value: Any) -> None:  # a ratio: the graphs' largest, not their sum
        out[name] = max(out.get(name, 0.0), round(float(value or 0.0), 3))

    for g in report.graphs:
        add("compile_s", g.compile_s)
        for stage in ("passes", "kernels", "speed_check"):
            add(stage + "_s", g.stages.get(stage))
        probes = g.stages.get("probes") or {}
        add("probe_tuning_s", probes.get("seconds"))
        add("probe_precompile_s", probes.get("precompile_seconds"))
        add("probe_spin_s", probes.get("spin_seconds"))
        add("probe_inputs_s", probes.get("inputs_seconds"))
        add("probe_warmup_s", probes.get("warmup_seconds"))
        add("probe_host_s", probes.get("host_seconds"))
        add("probe_spin_fallbacks", probes.get("spin_fallbacks"))
        add("probe_spin_rebatches", probes.get("spin_rebatches"))
        peak("probe_behind_queue_ratio", probes.get("behind_queue_ratio"))
        add("probes_tuned", probes.get("tuned"))
        add("probe_layer_candidates", probes.get("layer_candidates"))
        add("probe_group_candidates", probes.get("group_candidates"))
        add("probe_async_candidates", probes.get("async_candidates"))  # compiled while the layers were timed
        add("probe_async_kernels", probes.get("async_kernels"))
        add("probe_async_s", probes.get("async_seconds"))
        add("probe_async_pending", probes.get("async_pending"))
        add("probe_stream_wait_s", probes.get("stream_wait_seconds"))  # timing waited for the streamed compiles
        add("probe_capture_failures", probes.get("capture_failures"))
        add("kernel_capture_failures", g.tuning.get("capture_failures"))
        add("kernel_tuning_s", g.tuning.get("seconds"))
        add("kernel_precompile_s", g.tuning.get("precompile_seconds"))
        add("kernel_spin_s", g.tuning.get("spin_seconds"))
        add("kernel_inputs_s", g.tuning.get("inputs_seconds"))
        add("kernel_warmup_s", g.tuning.get("warmup_seconds"))
        add("kernel_host_s", g.tuning.get("host_seconds"))
        add("kernel_slow_hosts", g.tuning.get("slow_hosts"))
        add("kernel_spin_fallbacks", g.tuning.get("spin_fallbacks"))
        add("kernel_spin_rebatches", g.tuning.get("spin_rebatches"))
        add("kernels_tuned", g.tuning.get("tuned"))
        for where, stats in (("probe", probes), ("kernel", g.tuning)):  # the compile workers' share
            for name in ("kernels", "compiled", "failed"):
                add(f"{where}_pool_{name}", stats.get("pool_" + name))
            add(f"{where}_pool_s", stats.get("pool_seconds"))
            add(f"{where}_pool_record_s", stats.get("pool_record_seconds"))
    return out


def quant_summary(report) -> Optional[Dict[str, Any]]:
    """What our engine quantized, tuned and left alone (None for the other peers)."""
    if report is None:
        return None
    layers = [q for g in report.graphs for q in g.quant]
    return {"quantized": sum(q["status"] == "quantized" for q in layers), "layers": len(layers),
            "slower_than_float": [r for g in report.graphs for r in g.slower_than_reference()],
            "standalone_quantizes": [q["reason"] for g in report.graphs for q in g.standalone_quantizes],
            "fallbacks": [f for g in report.graphs for f in g.fallbacks],
            "kernels": sorted({k["impl"] for g in report.graphs for k in g.kernels}),
            "gemm_choices": gemm_choices(report), "float_layers": float_reasons(layers)}


def float_reasons(layers: List[Dict[str, Any]], limit: int = 12) -> List[Dict[str, Any]]:
    """Why layers stayed float, one row per distinct reason (digits kept: the times in a
    quant_layers="faster" refusal tell which GEMM lost by how much), most frequent first."""
    counts: Dict[str, List[str]] = {}
    for q in layers:
        if q["status"] != "quantized":
            counts.setdefault(q.get("reason") or "", []).append(q["name"])
    rows = [{"reason": r, "n": len(names), "first": names[0]} for r, names in counts.items()]
    return sorted(rows, key=lambda r: -r["n"])[:limit]


def gemm_choices(report) -> List[Dict[str, Any]]:
    """The tuner's pick per distinct GEMM / convolution group, quantized and float (ops,
    implementation, weight-only path, tile, tuned ms, the next fastest candidates (``runners_up``,
    the first layer's) and, for an 8-bit group, the float reference's), once per distinct row:
    what a latency is made of, layer kind by layer kind. A group built without
    timing (tuning off, or the budget spent) says ``timed: "not timed"``: INT8 BERT's FFN1 (FP16
    GEMM + GELU + INT8 quantize) took 52 us where the FP16 engine's took 33 (session 13), and
    only the 8-bit groups' picks were recorded then."""
    rows: Dict[str, Dict[str, Any]] = {}
    for g in report.graphs:
        for k in g.kernels:
            c = k.get("config") or {}
            if k.get("kind") not in ("gemm", "conv"):
                continue
            ops = [o for o in dict.fromkeys(k["ops"]) if o != "aten.view"]
            fields = {f: c[f] for f in ("impl", "vendor", "epilogue", "epilogue_tile", "path", "fused", "block_m",
                                        "block_n", "block_k", "num_warps", "num_stages", "split_k", "unroll", "tma",
                                        "epilogue_split", "tuned_ms", "reference_ms", "timed") if f in c}
            fields.setdefault("timed", "not timed")
            key = repr((ops, sorted(fields.items())))
            # the first layer's runners-up stand for the row (their times differ layer by layer)
            extra = {"runners_up": c["runners_up"]} if c.get("runners_up") else {}
            rows.setdefault(key, {"ops": ops, "kind": k["kind"], "n": 0, **fields, **extra})["n"] += 1
    return list(rows.values())


def run_peer(peer: str, model, inputs, ref, logits, args, root: str) -> Dict[str, Any]:
    record: Dict[str, Any] = {"backend": peer}
    clean_slate(args.device)
    cache = os.path.join(root, peer)
    try:
        with fresh_compiler_caches(cache), torch.no_grad():
            fn, prep_s, report = build_peer(peer, model, inputs, args.device, os.path.join(cache, "cb"), args.autotune,
                                            args.quant_layers, args.compile_processes)
            record["prepare_s"] = prep_s
            call = make_call("inductor-reduce-overhead" if peer in TORCHAO else peer, fn, inputs)
            timed = first_and_steady(call, args.iters, args.warmup, args.device)
            record["first_call_s"] = timed.pop("first_s")
            record.update(timed)
            record["accuracy"] = compare(snapshot(call()), ref, logits)
            record["quant"] = quant_summary(report)
            record["compile_stages"] = compile_stages(report)
            if args.profile and args.device.startswith("cuda"):  # where an engine's time goes, kernel by kernel
                from .kernel_profile import format_profile, profile_kernels

                record["profile"] = profile_kernels(call, calls=5, warmup=2, top=30)
                log(format_profile({"peer": peer, **record["profile"]}))
        log(f"{peer}: {record['median_ms']:.3f} ms, cosine {record['accuracy']['cosine']:.5f}, "
            f"first call {record['first_call_s']:.1f} s")
    except Exception as exc:  # noqa: BLE001  (one failing peer must not end the case)
        record_failure(record, exc, lambda m: log(f"{peer}: {m}"))
    finally:
        torch._dynamo.reset()
    return record


def available_peers(requested: Sequence[str]) -> List[str]:
    """``requested`` without the torchao peers when torchao does not import (recorded apart)."""
    try:
        import torchao.quantization  # noqa: F401
        have_ao = True
    except Exception:  # noqa: BLE001  (absent, or built for another torch)
        have_ao = False
    return [p for p in requested if have_ao or p not in TORCHAO]


def run_case(case: str, peers: Sequence[str], args, results: ResultsFile, records: List[dict], env: dict) -> None:
    loaded = real_models.load_case(case, args.size, args.device, log)
    if loaded is None:
        return
    name, batch, model, inputs, logits = loaded
    with torch.no_grad(), strict_fp32():
        ref = snapshot(model(*inputs))
    model = model.to(torch.float16)
    inputs = tuple(to_device(t, args.device, torch.float16) for t in inputs)
    with tempfile.TemporaryDirectory() as root:
        for peer in peers:
            record = run_peer(peer, model, inputs, ref, logits, args, root)
            record.update(case=case, model=name, batch=batch, precision="fp16 model", kind="quant_suite",
                          quant_layers=args.quant_layers, compile_processes=args.compile_processes, **env)
            records.append(record)
            results.write(records)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_suite", description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["mlp:2048", "hf_bert_mask:16", "hf_gpt2:8", "tv_vit_b_16:32",
                                                  "tv_resnet50:32", "tv_resnet50:1"])
    p.add_argument("--peers", default=",".join(ALL_PEERS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("tiny", "base"), default="base")
    p.add_argument("--autotune", default="fast")
    p.add_argument("--quant-layers", default="faster", choices=("faster", "all"),
                   help="our quantized engines: quantize only the layers whose 8-bit GEMM is faster (default), or all")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--compile-processes", type=int, default=None,
                   help="our engines' compile_processes option (0: every Triton compile in this process)")
    p.add_argument("--profile", action="store_true", help="each peer's GPU kernels per call (torch.profiler)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    requested, unknown = real_models.parse_peers(args.peers, KNOWN_PEERS)
    if unknown:
        p.error(f"unknown peer(s) {unknown}; choose among {', '.join(KNOWN_PEERS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("needs a CUDA device (or --device cpu --size tiny to check the script)")
        return 2
    peers = available_peers(requested)
    env = environment(args.device, commit=os.environ.get("COMMIT"))
    env["skipped_peers"] = {p: "torchao does not import here" for p in requested if p not in peers}
    with tempfile.TemporaryDirectory() as root:  # so the first peer's first call carries no process start-up
        env["primed_s"] = round(prime_process(args.device, root), 2)
    log(f"process primed in {env['primed_s']} s (first compile of a small model)")
    results, records = ResultsFile(args.out), []
    for case in args.cases:
        run_case(case, peers, args, results, records, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
