"""A chain of decode GEMVs in one CUDA graph: what each launch costs, what a launch costs at the
least, and whether Programmatic Dependent Launch (PDL) shortens a chain of our INT4 GEMVs.

    PYTHONPATH=. python3 -m benchmarks.gemv_chain --out $OUT/gemv_chain.json --commit <sha>
    CHAIN_ARGS="--layers 22 --iters 20" bash benchmarks/device/quant_run.sh chain:300   (the GPU machine)

The issue's ~1.1B decoder (hidden 2048, intermediate 5632, 32 heads of 64, 4 KV heads) at decode
(M = 1, fp16 x): per layer its four GEMVs in decode order, qkv 2560x2048, o 2048x2048, gate_up
11264x2048, down 2048x5632, INT4 (group 128) or ``--weights int8``, each layer its own weights
(22 layers: ~0.5 GB of INT4, nothing stays in L2). A GEMV's x is the first K columns of the one
before's output: a real dependency, as in a decode step. Configs: per shape what the engine's
tuner picks at "fast" for a lone ``weight_only_linear`` (the fastest gemv candidate where another
path won), the same for every variant. Each variant is the whole chain (layers x 4 launches)
captured as ONE CUDA graph: 3 warm-up replays, 5 blocks of ``--iters`` back-to-back replays
between two CUDA events, the median block; ms a chain, us a launch, the weights' GB/s:

* ``gemv`` / ``gemv_pdl``: the chain as the engine launches it, without and with PDL (the wait
  after the first step's weight load, ``gemv.PDL_AFTER``; ``launch_pdl``): does starting a kernel
  while the one before drains shorten the chain? Outputs bitwise equal: ``pdl_equal``.
  ``gemv_pdl_top``: the wait first, before any load (as the floor kernels). H100, session 24, us
  a launch: 6.15 plain, 5.40 PDL, 6.11 wait first; 6.80 with a bulk L2 prefetch of the
  program's rows before the wait as well (the engine's form until then, removed).
* ``empty`` / ``empty_pdl``: as many 1-program launches, each storing the one before's value + 1:
  the floor of a launch in a graph.
* ``copy`` / ``copy_pdl``: per GEMV one launch reading its codes' and scales' bytes (a max a program
  stored): the read-bandwidth floor for the chain's bytes in as many launches.
* ``standalone``: each shape's GEMV alone, back to back over weights rotated beyond L2 (as
  weight_only_bench), summed over the chain: its time if launches did not interact.

``--cpu-smoke``: tiny shapes on the CPU under TRITON_INTERPRET=1, run once eagerly (no graph,
nothing timed): the configs, every non-PDL chain and the checks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

if "--cpu-smoke" in sys.argv:  # before Triton decorates a kernel (it picks the interpreter then)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

import compile_backend.ops  # noqa: F401  (registers compile_backend::weight_only_linear)
from compile_backend.speed_check import cuda_event_ms
from benchmarks.weight_only_bench import L2_BYTES
from compile_backend.kernels import gemm_template as tpl
from compile_backend.kernels import gemv, pdl, weight_only_ref
from compile_backend.kernels.base import triton_interpret
from compile_backend.kernels.gemv_prologue import PLAIN_X
from compile_backend.kernels.launch import Counters
from compile_backend.kernels.weight_only import WeightOnlyConfig, weight_only_linear_reference

VARIANTS = ("gemv", "gemv_pdl", "gemv_pdl_top", "empty", "empty_pdl", "copy", "copy_pdl", "standalone")
FP16 = torch.float16
REL_TOL = 1e-2  # relative L2 error of an fp16 GEMV against the reference (test_gemv's bound)
COPY_BLOCK = 4096  # int32 words a copy program reads: 16 KB, eight 16-byte loads a thread at 4 warps
STANDALONE_CALLS = 20  # a shape's standalone graph: at least this many calls (weight_only_bench's)
Shape = Tuple[str, int, int]  # (name, N, K)

# the floor kernels as source, so PDL's entry goes in as for the GEMV (pdl.with_entry)
FLOOR_SOURCE = '''\
import triton
import triton.language as tl


@triton.jit
def bump(SRC, DST):
    tl.store(DST, tl.load(SRC) + 1.0)


@triton.jit
def read_words(W, NW, S, NS, MAXES, W_PROGRAMS, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < W_PROGRAMS:  # the codes, then the scales: a GEMV's bytes in one launch
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(W + offs, mask=offs < NW, other=0)
    else:
        offs = (pid - W_PROGRAMS) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(S + offs, mask=offs < NS, other=0)
    tl.store(MAXES + pid, tl.max(v, axis=0))  # stored, so the loads are not dead code (a max: no overflow)
'''


def decoder_shapes(hidden: int = 2048, intermediate: int = 5632, heads: int = 32, kv_heads: int = 4,
                   head_dim: int = 64) -> List[Shape]:
    """A decoder layer's GEMVs in decode order, qkv and gate/up fused as the engine runs them."""
    return [("qkv", (heads + 2 * kv_heads) * head_dim, hidden), ("o", hidden, heads * head_dim),
            ("gate_up", 2 * intermediate, hidden), ("down", hidden, intermediate)]


SMOKE_SHAPES = decoder_shapes(hidden=128, intermediate=256, heads=2, kv_heads=1)


def group_size(weights: str, group: int) -> Optional[int]:
    return group if weights == "int4" else None  # INT8: a scale per row


def weight_bytes(codes: torch.Tensor, scales: torch.Tensor) -> int:
    return codes.numel() * codes.element_size() + scales.numel() * scales.element_size()


def quantized(n: int, k: int, weights: str, group: int, device, gen=None):
    """(codes, scales) of an N(0, 1/K) weight quantized as the engine does: a GEMV keeps its x's
    scale, so 88 in a row stay finite in fp16."""
    w = torch.randn(n, k, generator=gen, device=device) / k ** 0.5
    return weight_only_ref.quantize_weight(w, weights, group_size(weights, group))


def make_weights(shapes: List[Shape], layers: int, weights: str, group: int, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [[quantized(n, k, weights, group, device, gen) for _, n, k in shapes] for _ in range(layers)]


def tuned_configs(shapes: List[Shape], weights: str, group: int, device, level: str = "fast"):
    """Per shape (config, record): the engine's choice at ``level`` for a lone weight_only_linear at
    M = 1 (``weight_only_candidates`` timed by ``autotune.Tuner``, no timing cache), or where another
    path (skinny) won, the fastest gemv candidate: the chain is of gemv launches. On the CPU the
    tuner times nothing: the heuristic's (its first candidate)."""
    from compile_backend.kernels.autotune import Tuner
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.template import traced_group
    from compile_backend.kernels.weight_only_build import weight_only_candidates
    from compile_backend.options import Options

    gs = group_size(weights, group)
    ctx = KernelContext(options=Options(autotune=level), device=device, interpret=triton_interpret())
    ctx.tuner = Tuner(level, cache=None, device=device)
    tunings = [weight_only_candidates(traced_group(
        lambda x, c, s: torch.ops.compile_backend.weight_only_linear(x, c, s, None, weights, gs),
        (torch.randn(1, k, device=device, dtype=FP16), *quantized(n, k, weights, group, device)),
        "gemm", "weight_only_linear"), ctx) for _, n, k in shapes]
    ctx.tuner.precompile([(t.key, t.candidates) for t in tunings])  # every shape's compiles in one pool
    out = []
    for (name, n, k), tuning in zip(shapes, tunings):
        choice = ctx.tuner.choose(tuning.key, tuning.candidates, tuning.make_inputs)
        times, pick = choice.timings_ms, choice.candidate
        if pick.config.get("path") != "gemv":
            pick = min((c for c in tuning.candidates if not c.reference and c.config.get("path") == "gemv"
                        and c.name in times), key=lambda c: times[c.name])
        cfg = WeightOnlyConfig(**{f.name: pick.config[f.name] for f in dataclasses.fields(WeightOnlyConfig)})
        fastest = [[round(ms * 1e3, 2), c] for ms, c in sorted((ms, c) for c, ms in times.items())[:6]]
        out.append((cfg, {"shape": name, "n": n, "k": k, "config": dataclasses.asdict(cfg), "candidate": pick.name,
                          "tuner_winner": choice.candidate.name, "fastest_us": fastest}))  # float linear: a yardstick
    return out


def gemv_source(use_pdl: bool, after: int = gemv.PDL_AFTER) -> Tuple[str, str]:
    """(source, name) of the plain fp16 GEMV (``gemv.plain_kernel``'s); with PDL, its wait/signal
    after the program ids and the first step's weights, as ``gemv_build`` renders a PDL candidate
    (or after ``after`` statements)."""
    source, name = gemv.render(PLAIN_X, gemv.PLAIN_EPILOGUE, FP16, FP16)
    return (pdl.with_entry(source, name, after=after) if use_pdl else source), name


def floor_kernel(name: str, use_pdl: bool):
    return tpl.load_kernel(pdl.with_entry(FLOOR_SOURCE, name) if use_pdl else FLOOR_SOURCE, name)


def launch_gemv(kernel, x, codes, scales, out, cfg, weights: str, group: int, counters: Counters,
                use_pdl: bool) -> None:
    """One GEMV as the engine's runner launches it. One ``Counters`` for every launch: each leaves
    its split-K counters at 0 (a launch without them zeroes a buffer: a memset node in the graph)."""
    gemv.launch(kernel, [x], codes, scales, None, [], [out], weights=weights, group=group if weights == "int4" else 1,
                config=cfg, x_dtype=FP16, counters=counters, use_pdl=use_pdl)


def gemv_chain(kernel, layer_weights, x0, outs, shapes: List[Shape], configs, weights: str, group: int,
               counters: Counters, use_pdl: bool) -> Callable[[], None]:
    """The chain (eager, or under a capture): GEMV i reads the first K columns of GEMV i - 1's
    output, the first ``x0``."""
    def run() -> None:
        x = x0
        for layer, out_row in zip(layer_weights, outs):
            for (codes, scales), out, (_, _, k), cfg in zip(layer, out_row, shapes, configs):
                launch_gemv(kernel, x[:, :k], codes, scales, out, cfg, weights, group, counters, use_pdl)
                x = out
    return run


def empty_chain(launches: int, device, use_pdl: bool):
    """``launches`` 1-program launches, slot[i + 1] = slot[i] + 1: the last slot ends at ``launches``."""
    kernel, slots = floor_kernel("bump", use_pdl), torch.zeros(launches + 1, device=device)
    views = [slots[i:i + 1] for i in range(launches + 1)]

    def run() -> None:
        for i in range(launches):
            kernel[(1,)](views[i], views[i + 1], num_warps=1, **pdl.launch_kwargs(use_pdl))
    return run, slots


def copy_chain(layer_weights, use_pdl: bool):
    """Per GEMV one launch reading its codes and scales as int32 words, a program's max stored."""
    kernel, launches = floor_kernel("read_words", use_pdl), []
    for codes, scales in (pair for layer in layer_weights for pair in layer):
        w, s = codes.reshape(-1).view(torch.int32), scales.reshape(-1).view(torch.int32)
        w_programs = math.ceil(w.numel() / COPY_BLOCK)
        maxes = torch.empty(w_programs + math.ceil(s.numel() / COPY_BLOCK), dtype=torch.int32, device=w.device)
        launches.append((w, s, w_programs, maxes))

    def run() -> None:
        for w, s, w_programs, maxes in launches:
            kernel[(maxes.numel(),)](w, w.numel(), s, s.numel(), maxes, w_programs, BLOCK=COPY_BLOCK, num_warps=4,
                                     **pdl.launch_kwargs(use_pdl))
    return run, launches


def copy_maxes_ok(w: torch.Tensor, s: torch.Tensor, w_programs: int, maxes: torch.Tensor) -> bool:
    """A copy launch stored its blocks' maxes (past the end: 0)."""
    def block_maxes(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, -t.numel() % COPY_BLOCK)).reshape(-1, COPY_BLOCK).amax(1)
    return torch.equal(torch.cat([block_maxes(w), block_maxes(s)]), maxes)


def graph_ms(run: Callable[[], None], iters: int, prepare: Callable[[], Any] = lambda: None,
             blocks: int = 5, warmup: int = 3) -> Tuple[float, List[float]]:
    """ms a replay of ``run``'s launches as one CUDA graph (the median block, every block): run
    once eagerly (compiles outside the capture), captured, ``prepare()`` (so what is left after
    is the replays' work), ``warmup`` replays, ``blocks`` x ``iters`` replays between events."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    prepare()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    def replays() -> None:
        for _ in range(iters):
            graph.replay()
    times = [cuda_event_ms(replays) / iters for _ in range(blocks)]
    return statistics.median(times), times


def standalone_us(layer_weights, shapes: List[Shape], configs, weights: str, group: int, counters: Counters,
                  iters: int) -> Dict[str, float]:
    """us a call of each shape's GEMV alone, the same x each call: a graph of one call a weight
    set over >= STANDALONE_CALLS sets and 2x L2_BYTES (the layers' own, then clones), so no call
    finds its weights in L2 (weight_only_bench's 20 calls of a 2 MB layer re-read 41 MB: L2 50 MB)."""
    kernel, per_call = tpl.load_kernel(*gemv_source(False)), {}
    for i, ((name, n, k), cfg) in enumerate(zip(shapes, configs)):
        own = [layer[i] for layer in layer_weights]
        count = max(STANDALONE_CALLS, math.ceil(2 * L2_BYTES / weight_bytes(*own[0])))
        sets = own[:count] + [tuple(t.clone() for t in own[j % len(own)]) for j in range(count - len(own))]
        x = torch.randn(1, k, device=own[0][0].device, dtype=FP16)
        out = torch.empty(1, n, device=x.device, dtype=FP16)

        def run() -> None:
            for codes, scales in sets:
                launch_gemv(kernel, x, codes, scales, out, cfg, weights, group, counters, False)
        per_call[name] = graph_ms(run, iters)[0] * 1e3 / len(sets)
    return per_call


def reference_errors(x0, layer_weights, outs, shapes: List[Shape], weights: str, group: int) -> List[float]:
    """Each GEMV's relative L2 error against ``weight_only_linear_reference`` on the x it read (the
    output before it, as the kernels left it), in chain order."""
    errs, x = [], x0
    for layer, out_row in zip(layer_weights, outs):
        for (codes, scales), out, (_, _, k) in zip(layer, out_row, shapes):
            want = weight_only_linear_reference(x[:, :k], codes, scales, precision=weights,
                                                group_size=group_size(weights, group)).double()
            errs.append(((out.double() - want).norm() / want.norm()).item())
            x = out
    return errs


class ChainBench:
    """The chain's configs and operands, built once; :meth:`variant` runs one. ``timed``: each as a
    CUDA graph, timed; else run once eagerly (the CPU smoke)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, shapes: List[Shape], layers: int,
                 timed: bool, result: Dict[str, Any]) -> None:
        self.args, self.device, self.shapes, self.layers, self.timed = args, device, shapes, layers, timed
        self.result, self.launches = result, layers * len(shapes)
        tuned = tuned_configs(shapes, args.weights, args.group, device)
        self.configs, result["configs"] = [cfg for cfg, _ in tuned], [info for _, info in tuned]
        self.weights = make_weights(shapes, layers, args.weights, args.group, device)
        self.nbytes = result["weight_bytes"] = sum(weight_bytes(*pair) for layer in self.weights for pair in layer)
        self.x0 = torch.randn(1, shapes[0][2], device=device, dtype=FP16)
        self.outs = [[torch.empty(1, n, device=device, dtype=FP16) for _, n, _ in shapes] for _ in range(layers)]
        self.counters = Counters()
        self.counters.get(1 << 16, device)  # sized once, before any capture (a resize would add a memset)
        self.finals: Dict[str, torch.Tensor] = {}  # each gemv variant's last output

    def variant(self, name: str) -> Dict[str, Any]:
        kind, pdl_mark, mode = name.partition("_pdl")
        args, use_pdl = self.args, bool(pdl_mark)
        if use_pdl and not pdl.available(self.device):
            return {"skipped": "pdl.available: False (needs sm_90+ and a Triton with launch_pdl)"}
        if name == "standalone" and not self.timed:
            return {"skipped": "untimed (no CUDA graphs on the CPU)"}
        if name == "standalone":
            per_call = standalone_us(self.weights, self.shapes, self.configs, args.weights, args.group,
                                     self.counters, args.iters)
            entry = {"per_call_us": {k: round(v, 2) for k, v in per_call.items()},
                     "ms_per_chain": self.layers * sum(per_call.values()) / 1e3}
        else:
            run, check = self.gemv(use_pdl, name, mode.lstrip("_")) if kind == "gemv" else getattr(self, kind)(use_pdl)
            if self.timed:
                ms, blocks = graph_ms(run, args.iters, self.forget_outputs if kind == "gemv" else lambda: None)
                entry = {"ms_per_chain": ms, "blocks_ms": [round(b, 5) for b in blocks]}
            else:
                run()
                entry = {"timed": False}
            entry.update(check())
        if "ms_per_chain" in entry:
            entry["us_per_launch"] = entry["ms_per_chain"] * 1e3 / self.launches
            if kind != "empty":  # the empty chain reads no weights
                entry["gb_per_s"] = self.nbytes / (entry["ms_per_chain"] * 1e-3) / 1e9
        return entry

    def forget_outputs(self) -> None:
        for out in (o for row in self.outs for o in row):
            out.fill_(float("nan"))  # an output the launches did not write passes no check

    def gemv(self, use_pdl: bool, name: str = "gemv", mode: str = ""):
        """(the chain, its check): the last output kept for ``pdl_equal``; after the plain chain,
        every GEMV against the reference. ``mode`` (PDL): "" the engine's form, "top" the wait
        before any load."""
        args = self.args
        self.forget_outputs()
        kernel = tpl.load_kernel(*gemv_source(use_pdl, 0 if mode == "top" else gemv.PDL_AFTER))
        run = gemv_chain(kernel, self.weights, self.x0, self.outs, self.shapes,
                         self.configs, args.weights, args.group, self.counters, use_pdl)

        def check() -> Dict[str, Any]:
            last = self.finals[name] = self.outs[-1][-1].clone()
            entry: Dict[str, Any] = {"finite": bool(torch.isfinite(last).all())}
            if not use_pdl:
                errs = reference_errors(self.x0, self.weights, self.outs, self.shapes, args.weights, args.group)
                entry["reference"] = self.result["reference"] = {
                    "first_rel_err": errs[0], "max_rel_err": max(errs), "ok": max(errs) < REL_TOL}
            if use_pdl and "gemv" in self.finals:
                entry["pdl_equal"] = torch.equal(last, self.finals["gemv"])
                self.result["pdl_equal"] = self.result.get("pdl_equal", True) and entry["pdl_equal"]
            return entry
        return run, check

    def empty(self, use_pdl: bool):
        run, slots = empty_chain(self.launches, self.device, use_pdl)
        return run, lambda: {"ok": slots[-1].item() == self.launches}

    def copy(self, use_pdl: bool):
        run, copies = copy_chain(self.weights, use_pdl)
        return run, lambda: {"ok": copy_maxes_ok(*copies[0]) and copy_maxes_ok(*copies[-1])}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gemv_chain", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 22; --cpu-smoke: 2)")
    p.add_argument("--iters", type=int, default=20, help="graph replays a timed block")
    p.add_argument("--weights", choices=("int4", "int8"), default="int4")
    p.add_argument("--group", type=int, default=128, help="INT4 group size")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1, untimed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from compile_backend.bench.results import environment

    smoke = args.cpu_smoke
    if smoke and not triton_interpret():
        raise SystemExit("--cpu-smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke)")
    device = torch.device("cpu" if smoke else "cuda")
    layers = args.layers or (2 if smoke else 22)
    result: Dict[str, Any] = {"bench": "gemv_chain", **environment(device.type, commit=args.commit),
                              "weights": args.weights, "group": group_size(args.weights, args.group), "layers": layers,
                              "iters": args.iters, "smoke": smoke}
    bench = ChainBench(args, device, SMOKE_SHAPES if smoke else decoder_shapes(), layers, not smoke, result)
    result.update(launches=bench.launches, variants={})
    for info in result["configs"]:
        print(json.dumps({"config": info}), flush=True)
    for name in args.variants:
        try:
            entry = {"variant": name, **bench.variant(name)}
        except Exception as exc:  # recorded; the other variants still run (GPU time is scarce)
            entry = {"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            result.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]  # the JSON's, not the log's tail
        result["variants"][name] = entry
        print(json.dumps(entry), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    summary(result)
    return 0


def summary(result: Dict[str, Any]) -> None:
    rows = result["variants"]
    base = rows.get("gemv", {}).get("ms_per_chain")
    print(f"\n{result['layers']} layers x 4 {result['weights']} GEMVs ({result['launches']} launches, "
          f"{result['weight_bytes'] / 1e9:.3f} GB) on {result['device']}: pdl_equal {result.get('pdl_equal')}, "
          f"reference ok {result.get('reference', {}).get('ok')}")
    print(f"{'variant':12s} {'ms/chain':>9s} {'us/launch':>10s} {'GB/s':>7s} {'vs gemv':>8s}")
    for name, row in rows.items():
        if "ms_per_chain" not in row:
            print(f"{name:12s} {row.get('skipped') or row.get('error') or 'untimed'}")
            continue
        ms, gbs = row["ms_per_chain"], row.get("gb_per_s")
        print(f"{name:12s} {ms:9.4f} {row['us_per_launch']:10.2f} {f'{gbs:.0f}' if gbs else '-':>7s} "
              f"{f'{ms / base:.3f}' if base else '-':>8s}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
