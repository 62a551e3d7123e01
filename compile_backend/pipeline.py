"""The pipeline: one ATen graph in, one engine per input shape out.

``compile_graph`` reads as the data flow of the product, top to bottom: specialise and freeze,
rewrite (fx_passes), partition into groups, choose and build each group's kernel (kernels/),
plan memory, assemble the engine. It runs on the first call with each new input shape (see
``runtime.CompiledGraph``), with the real inputs in hand, so freezing, tuning and the one-time
validation of every kernel use real values. ``compile_graph_cached`` puts the engine cache
(cache/plan.py) in front of it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from . import capture, fx_passes, memory_plan
from .cache import plan as plans
from .cache import post_pass
from .cache import scope as scopes
from .engine import Engine, GroupCall
from .fx_passes.constant_fold import constant_programs, freeze
from .fx_passes.rules import written_placeholders
from .groups import fuse_groups, inline_aten_groups
from .kernels.base import KernelContext, KernelGroup, op_name, triton_enabled, triton_interpret
from .kernels.autotune import start_compile_workers
from .kernels.select import choose_kernel, compile_ahead
from .options import Options
from .quant.qat_report import fake_quant_placement, mark_fake_quant
from .quant.standalone import standalone_quantizes
from .report import GraphReport
from .input_writes import write_inputs_in_place
from .stack_outputs import write_stacks_in_place

log = logging.getLogger("compile_backend")


def compile_graph_cached(
    aten_gm: fx.GraphModule,
    args: Sequence[Any],
    *,
    role: str,
    frozen: Optional[Sequence[bool]],
    options: Options,
    report: GraphReport,
) -> Engine:
    """``compile_graph`` through the engine cache where generated kernels run (elsewhere there
    is no kernel plan worth storing: the cache is off)."""
    device = graph_device(args)
    if not triton_enabled(device):
        report.cache = {"engine": "off", "reason": "no generated kernels on this device"}
        return compile_graph(aten_gm, args, role=role, frozen=frozen, options=options, report=report)
    from .cache import EngineCache

    store = EngineCache(options.cache_dir, max_bytes=options.cache_max_bytes)
    return compile_with_cache(store, aten_gm, args, role=role, frozen=frozen, options=options, report=report)


def compile_with_cache(store, aten_gm: fx.GraphModule, args: Sequence[Any], *, role: str,
                       frozen: Optional[Sequence[bool]], options: Options, report: GraphReport) -> Engine:
    """``compile_graph`` through ``store`` (a ``cache.EngineCache``): a hit rebuilds the engine
    from its stored post-pass graph (no fx passes) and plan (no tuning, no validation), a miss
    builds it cold and stores both. Two processes missing the same key build it once (the
    second waits on the key's lock, then hits)."""
    device = graph_device(args)
    key = plans.cache_key(aten_gm, args, role=role, frozen=frozen, options=options, device=device)
    cold: Dict[str, Any] = {}

    def build_cold():
        start_compile_workers(options, device)  # their imports overlap the passes
        timings = plans.PlanTimings()
        front = timed_front(aten_gm, args, role=role, frozen=frozen, options=options, report=report)
        try:  # before the later stages touch the graph
            files, tensors = post_pass.dump(front, aten_gm)
            cold["graph"] = "stored"
        except post_pass.Unstorable as exc:  # hits will re-run the passes
            files, tensors = {}, {}
            cold["graph"], cold["graph_reason"] = "not stored", str(exc)
        cold["engine"] = compile_graph(aten_gm, args, role=role, frozen=frozen, options=options,
                                       report=report, timings=timings, front=front)
        made = plans.artifacts(cold["engine"].calls, cold["engine"].fallbacks, timings, cold["engine"].source)
        made.files.update(files)
        made.tensors.update(tensors)
        made.meta["graph"] = {"state": cold["graph"], "reason": cold.get("graph_reason")}
        return made

    entry = store.build_or_get(key, build_cold)
    stats = store.stats()
    report.cache = {"engine": "miss" if "engine" in cold else "hit", "key": key.digest[:16],
                    "stored": entry.stored, "bypasses": stats["bypasses"]}
    if "engine" in cold:
        engine = cold["engine"]
        report.cache.update(passes="ran", graph=cold["graph"])
        if "graph_reason" in cold:
            report.cache["graph_reason"] = cold["graph_reason"]
    else:
        plan = plans.Plan.from_meta(entry.meta)
        if plan is None:  # unreachable while the plan format is in the key; never trust it blindly
            report.cache["engine"] = "bypass"
            report.cache["reason"] = "entry holds no plan of this format"
        front = _stored_front(entry, aten_gm, args, device, report)
        engine = compile_graph(aten_gm, args, role=role, frozen=frozen, options=options, report=report,
                               timings=plans.PlanTimings(plan=plan), plan=plan, front=front)
    engine.cache_key = key.digest  # what the speed check's stored verdict is filed under
    return engine


def _stored_front(entry, aten_gm, args, device, report: GraphReport) -> Optional[post_pass.PostPass]:
    """The entry's post-pass graph bound to this call's weights, or None (the passes re-run;
    the report says why). A stored graph is untrusted input: any failure to read it is a refusal."""
    stored = entry.meta.get("graph") if isinstance(entry.meta.get("graph"), dict) else {}
    if stored.get("state") != "stored":
        report.cache.update(passes="ran", graph="not stored",
                            graph_reason=str(stored.get("reason") or "the entry holds no graph"))
        return None
    try:
        front = post_pass.load(entry.files, entry.tensors, aten_gm, args, device)
    except Exception as exc:  # BadGraph, or whatever malformed data makes torch raise
        reason = str(exc) if isinstance(exc, post_pass.BadGraph) else f"{type(exc).__name__}: {exc}"
        log.warning("compile_backend: stored graph refused (%s); running the passes", reason)
        report.cache.update(passes="ran", graph="refused", graph_reason=reason)
        return None
    report.cache.update(passes="skipped", graph="loaded")
    return front


def compile_graph(
    aten_gm: fx.GraphModule,
    args: Sequence[Any],
    *,
    role: str,
    frozen: Optional[Sequence[bool]],
    options: Options,
    report: GraphReport,
    timings: Optional[plans.PlanTimings] = None,
    plan: Optional[plans.Plan] = None,
    front: Optional[post_pass.PostPass] = None,  # the stored result of run_front (a cache hit)
) -> Engine:
    device = graph_device(args)
    if front is None:
        front = timed_front(aten_gm, args, role=role, frozen=frozen, options=options, report=report)
    gm = front.gm
    report.passes, report.rules, report.quant = front.passes, front.rules, front.quant
    with _stage("partition"):
        groups = fx_passes.partition(gm)                        # ops -> kernel groups
        graph, calls = fuse_groups(gm, groups)
    scope = scopes.open_scope(options.cache_dir, device) if triton_enabled(device) else None
    kctx = kernel_context(options, device, scope, timings, plan)
    with scopes.triton_binaries(scope, triton_enabled(device)), _timed(report, "kernels"):
        fallbacks = build_kernels(graph, calls, gm, args, kctx, report)  # Triton / vendor / ATen
    if options.quant is not None:                               # quantizes left on their own, and why
        report.standalone_quantizes = standalone_quantizes(graph)
    if role != "inference":                                     # where QAT's fake quantization runs
        report.fake_quant = fake_quant_placement(graph)
    report.tuning = dict(kctx.tuner.stats) if kctx.tuner is not None else {}
    _in_place(write_stacks_in_place(graph), report, fallbacks)  # stacked outputs written where made
    report.input_writes = _input_writes(write_inputs_in_place(graph), graph, report)  # a KV cache written in place
    inline_aten_groups(graph, calls)
    memory = memory_plan.plan(graph)                            # kernel outputs share one arena
    report.memory = memory_plan.summary(memory, graph, front.eager_peak)
    engine = Engine(graph, len(args), _constants(gm), front.programs, front.bound, args, memory, device,
                    interpreted=kctx.interpret and triton_enabled(device),
                    calls=calls, fallbacks=fallbacks,           # the plan the engine cache stores
                    first_call_context=functools.partial(scopes.triton_binaries, scope, triton_enabled(device)),
                    cuda_graph=wants_cuda_graph(options, role, device),  # record once, replay
                    static_inputs=aten_gm.meta.get(capture.STATIC_INPUTS_META, ()),  # read in place by it
                    returned_outputs=aten_gm.meta.get(capture.RETURNED_OUTPUTS_META))  # the rest: saved
    report.cuda_graph = engine.cuda_graph is not None
    return engine


def run_front(aten_gm: fx.GraphModule, args: Sequence[Any], *, role: str, frozen: Optional[Sequence[bool]],
              options: Options) -> post_pass.PostPass:
    """Specialise, freeze and run every fx pass: what a cache hit reads back instead."""
    device = graph_device(args)
    with _stage("specialize"):
        gm = capture.specialize(aten_gm, args)                  # concrete shapes
        _number_placeholders(gm)
        bound = freeze(gm, frozen, args, aten_gm.meta.get(capture.PARAM_NAMES_META)) if frozen else {}
        eager_peak = memory_plan.eager_peak_bytes(gm.graph)      # before passes: what eager holds
    ctx = fx_passes.PassContext(training=role != "inference", precision=options.precision, device=device,
                                quant=quant_request(options))   # options["quant"]: what to quantize
    with layer_speed(ctx, options) as scope:                    # quant_layers="faster": 8 bits where it pays
        with scopes.triton_binaries(scope, scope is not None):
            counts = fx_passes.run_passes(gm, ctx)              # clean-up, folding, quantizing, layout
    if ctx.training:
        mark_fake_quant(gm)                                     # QAT's ops, for the report (kept when stored)
    quant = list(ctx.quant.records.values()) if ctx.quant is not None else []
    return post_pass.PostPass(gm, constant_programs(gm), bound, eager_peak, counts.totals, counts.rules, quant,
                              probes=ctx.stats.get("probes", {}))


def timed_front(aten_gm: fx.GraphModule, args: Sequence[Any], *, role: str, frozen: Optional[Sequence[bool]],
                options: Options, report: GraphReport) -> post_pass.PostPass:
    """``run_front``, its seconds and its layer speed probes' counters in ``report.stages``."""
    with _timed(report, "passes"):
        front = run_front(aten_gm, args, role=role, frozen=frozen, options=options)
    report.stages["probes"] = front.probes
    return front


@contextlib.contextmanager
def _timed(report: GraphReport, stage: str):
    """Seconds spent in the block, as ``report.stages[stage]`` (where a first call's time went)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.stages[stage] = round(time.perf_counter() - t0, 3)


@contextlib.contextmanager
def _stage(name: str):
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, "op"):
            exc.op = name  # the fallback warning names where it failed
        raise


def quant_request(options: Options):
    if options.quant is None:
        return None
    from .fx_passes.quantize import QuantRequest
    from .quant.request import build_request

    request = build_request(options.quant)
    if isinstance(request, QuantRequest):
        request.gelu = options.quant_gelu
        request.residuals = options.quant_residuals
    return request


@contextlib.contextmanager
def layer_speed(ctx: fx_passes.PassContext, options: Options):
    """With an INT8/FP8 request on CUDA and ``quant_layers="faster"``, give the quantize pass a
    :class:`quant.speed.LayerSpeed` (the tuner on this device, its timing cache); yields the cache
    scope it times in (None: nothing is measured)."""
    from .fx_passes.quantize import QuantRequest

    request = ctx.quant
    if not (isinstance(request, QuantRequest) and not ctx.training and options.quant_layers == "faster"
            and triton_enabled(ctx.device) and not triton_interpret() and ctx.device.type == "cuda"):
        yield None
        return
    from .quant.speed import LayerSpeed

    scope = scopes.open_scope(options.cache_dir, ctx.device)
    kctx = kernel_context(options, ctx.device, scope)
    request.speed = LayerSpeed(kctx, request.precision, request.per_channel, request.dynamic)
    try:
        yield scope
    finally:
        counts = getattr(request.speed, "counts", {})
        request.speed = None
        if kctx.tuner is not None:
            kctx.tuner.collect_async()
        ctx.stats["probes"] = dict(kctx.tuner.stats, **counts) if kctx.tuner is not None else dict(counts)


def kernel_context(options: Options, device: torch.device, scope, timings: Optional[plans.PlanTimings] = None,
                   plan: Optional[plans.Plan] = None) -> KernelContext:
    """The kernel builders' context: tuning results read and written through the cache
    ``scope``'s timing cache (and ``plan``'s stored choices, on an engine-cache hit)."""
    timings = timings or plans.PlanTimings()
    timings.backing = scopes.timing_cache(scope)
    return KernelContext(options=options, device=device, interpret=triton_interpret(), timing_cache=timings,
                         progress=_progress, plan=plan)


def wants_cuda_graph(options: Options, role: str, device: torch.device) -> bool:
    """CUDA graphs on CUDA ("auto" and "on"), training graphs included: a forward's saved
    activations are its recording's outputs, handed out and not replayed over while autograd
    holds them (cuda_graph.py). A BERT-base training step launches ~800 kernels: launched one by
    one, our step took 3.4x Inductor's (H100, session 11, benchmarks/notes/qat.md)."""
    return options.cuda_graphs != "off" and device.type == "cuda"


def graph_device(args: Sequence[Any]) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def build_kernels(graph, calls, gm, args, ctx: KernelContext, report: GraphReport) -> Dict[str, List]:
    """Choose each group's kernel. Where Triton runs, the graph is executed once on the real
    inputs so every kernel is built (and tuned, and checked) with the values it will see.
    Returns the fallback entries per group name (empty for groups our kernels run)."""
    chosen: Dict[str, List] = {}
    if not triton_enabled(ctx.device):
        for call in calls:
            call.kernel, fallbacks = choose_kernel(call.group, (), ctx)
            chosen[call.group.name] = _record(report, call, fallbacks)
        return chosen
    env: Dict[fx.Node, Any] = {}
    last_use = {}
    for node in graph.nodes:
        for x in node.all_input_nodes:
            last_use[x] = node
    compile_ahead([call.group for call in calls], ctx)  # every tuned group's candidates, in one pool
    constants = _constants(gm)
    written = set(written_placeholders(graph))  # the build's run must leave the caller's inputs as they are
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = args[node.meta["arg_index"]]
            if node in written:
                env[node] = env[node].clone()
        elif node.op == "get_attr":
            env[node] = constants[node.target]
        elif node.op == "call_function":
            a = fx.node.map_arg(node.args, lambda n: env[n])
            kw = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if isinstance(node.target, GroupCall):
                call = node.target
                _annotate(call.group, a)
                log.debug("compile_backend: building %s (%s)", call.group.name, call.group.kind)
                call.kernel, fallbacks = choose_kernel(call.group, a, ctx)
                chosen[call.group.name] = _record(report, call, fallbacks)
                env[node] = call.group.reference(*a)
            else:
                with _stage(op_name(node.target)):
                    env[node] = node.target(*a, **kw)
        for x in node.all_input_nodes:
            if last_use.get(x) is node:
                env.pop(x, None)
    return chosen


def _progress(message: str) -> None:
    # long work (autotuning) reports progress on stderr, as a user waiting for it expects
    print(f"compile_backend: {message}", file=sys.stderr, flush=True)


def _annotate(group: KernelGroup, inputs: Sequence[Any]) -> None:
    """Set meta['val'] of every group node to a meta-device tensor of its real value."""

    class _Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = _to_meta(out)
            return out

    _Record(group.gm).run(*inputs)


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


def _record(report: GraphReport, call: GroupCall, fallbacks: List[Dict[str, str]]) -> List[Dict[str, str]]:
    call.report_index = len(report.kernels)  # type: ignore[attr-defined]
    report.kernels.append(call.kernel.describe())
    report.fallbacks.extend(fallbacks)
    return fallbacks


def _input_writes(in_place: List, graph: fx.Graph, report: GraphReport) -> List[Dict[str, Any]]:
    """The report's entries: inputs our kernels write in place, inputs an ATen op writes in place
    (its group's kernel entry says which op), then the inputs ATen copies into."""
    out = []
    for call, k, op in in_place:
        if op is None:
            out.append({"input": call.out_views[k][0].meta.get("arg_index"), "by": "kernel", "kernel": call.report_index})
        else:
            index = op.args[0].meta.get("arg_index")
            report.kernels[call.report_index]["config"] = {"in_place": f"{op_name(op.target)} into input {index}"}
            out.append({"input": index, "by": "aten in place", "kernel": call.report_index})
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default and \
                isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder":
            out.append({"input": node.args[0].meta.get("arg_index"), "by": "copy_"})
    return out


def _in_place(stacks: List[GroupCall], report: GraphReport, fallbacks: Dict[str, List]) -> None:
    """Stacks whose pieces' kernels write their slices run no kernel: the report says so."""
    for call in stacks:
        entry = report.kernels[call.report_index]  # type: ignore[attr-defined]
        entry["impl"], entry["config"] = "in place", {"written_by": "each piece's kernel, into its slice"}
        gone = fallbacks.pop(call.group.name, [])
        report.fallbacks[:] = [f for f in report.fallbacks if not any(f is g for g in gone)]


def _constants(gm: fx.GraphModule) -> Dict[str, Any]:
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            out[node.target] = obj
    return out


def _number_placeholders(gm: fx.GraphModule) -> None:
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        node.meta["arg_index"] = i


__all__ = ["compile_graph", "compile_graph_cached", "compile_with_cache", "run_front", "build_kernels"]
