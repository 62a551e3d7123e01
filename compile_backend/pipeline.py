"""The pipeline: one ATen graph in, one engine per input shape out.

``compile_graph`` reads as the data flow in DESIGN.md, top to bottom. It runs on the first
call with each new input shape (engines are specialised per shape), with the real inputs in
hand, so freezing, tuning and the one-time validation of every kernel use real values.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import capture, engine_cache, fx_passes, memory_plan, tuning_store
from .engine import Engine, GroupCall, WeightLayoutChanged
from .fx_passes.constant_fold import constant_programs, freeze
from .kernels.base import INTERPRETER_LOCK, KernelContext, KernelGroup, op_name
from .kernels.select import choose_kernel, triton_enabled, triton_interpret
from .options import Options
from .profiles import GraphProfiles, Plan
from .report import GraphReport

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
    """``compile_graph`` through the engine cache: a hit rebuilds the engine from its stored plan
    (no tuning, no validation), a miss builds it cold and stores the plan. Two processes missing
    the same key build it once (the second waits on the key's lock, then hits)."""
    device = graph_device(args)
    if not triton_enabled(device):
        report.cache = {"engine": "off", "reason": "no generated kernels on this device"}
        return compile_graph(aten_gm, args, role=role, frozen=frozen, options=options, report=report)
    from .cache import EngineCache

    store = EngineCache(options.cache_dir, max_bytes=options.cache_max_bytes)
    key = engine_cache.cache_key(aten_gm, args, role=role, frozen=frozen, options=options, device=device)
    cold: Dict[str, Any] = {}

    def build_cold():
        timings = engine_cache.PlanTimings()
        cold["engine"] = compile_graph(aten_gm, args, role=role, frozen=frozen, options=options,
                                       report=report, timings=timings)
        return engine_cache.artifacts(cold["engine"].calls, cold["engine"].fallbacks, timings,
                                      cold["engine"].source)

    entry = store.build_or_get(key, build_cold)
    stats = store.stats()
    report.cache = {"engine": "miss" if "engine" in cold else "hit", "key": key.digest[:16],
                    "stored": entry.stored, "bypasses": stats["bypasses"]}
    if "engine" in cold:
        return cold["engine"]
    plan = engine_cache.Plan.from_meta(entry.meta)
    if plan is None:  # unreachable while the plan format is in the key; never trust it blindly
        report.cache["engine"] = "bypass"
        report.cache["reason"] = "entry holds no plan of this format"
    return compile_graph(aten_gm, args, role=role, frozen=frozen, options=options, report=report,
                         timings=engine_cache.PlanTimings(plan=plan), plan=plan)


def compile_graph(
    aten_gm: fx.GraphModule,
    args: Sequence[Any],
    *,
    role: str,
    frozen: Optional[Sequence[bool]],
    options: Options,
    report: GraphReport,
    timings: Optional[engine_cache.PlanTimings] = None,
    plan: Optional[engine_cache.Plan] = None,
) -> Engine:
    device = graph_device(args)
    with _stage("specialize"):
        gm = capture.specialize(aten_gm, args)                  # concrete shapes
        _number_placeholders(gm)
        bound = freeze(gm, frozen, args) if frozen else {}       # weights -> constants
        eager_peak = memory_plan.eager_peak_bytes(gm.graph)      # before passes: what eager holds
    ctx = fx_passes.PassContext(training=role != "inference", precision=options.precision, device=device)
    report.passes = fx_passes.run_passes(gm, ctx)               # clean-up, folding, fusion, layout
    with _stage("partition"):
        groups = fx_passes.partition(gm)                        # ops -> kernel groups
        graph, calls = fuse_groups(gm, groups)
    scope = tuning_store.open_scope(options.cache_dir, device) if triton_enabled(device) else None
    timings = timings or engine_cache.PlanTimings()
    timings.backing = tuning_store.timing_cache(scope)
    kctx = KernelContext(options=options, device=device, interpret=triton_interpret(),
                         timing_cache=timings, progress=_progress, plan=plan)
    with tuning_store.triton_binaries(scope, triton_enabled(device)):
        fallbacks = build_kernels(graph, calls, gm, args, kctx, report)  # Triton / vendor / ATen
    tuner = getattr(kctx, "tuner", None)  # set by the first group that asked the tuner
    report.tuning = dict(tuner.stats) if tuner is not None else {}
    constants = _constants(gm)
    inline_aten_groups(graph, calls)
    memory = memory_plan.plan(graph)                            # kernel outputs share one arena
    report.memory = memory_plan.summary(memory, graph, eager_peak)
    engine = Engine(graph, len(args), constants, constant_programs(gm), bound, args, memory, device,
                    interpreted=kctx.interpret and triton_enabled(device))
    engine.calls, engine.fallbacks = calls, fallbacks  # what the engine cache stores as the plan
    engine.first_call_context = functools.partial(tuning_store.triton_binaries, scope, triton_enabled(device))
    if wants_cuda_graph(options, role, device):
        engine.use_cuda_graph()                                 # record once, replay launches
    report.cuda_graph = engine.cuda_graph is not None
    return engine


@contextlib.contextmanager
def _stage(name: str):
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, "op"):
            exc.op = name  # the fallback warning names where it failed
        raise


def wants_cuda_graph(options: Options, role: str, device: torch.device) -> bool:
    """CUDA graphs for inference on CUDA ("auto" and "on"); training graphs run launch by launch
    (their saved activations would have to outlive the graph's memory pool). AOTAutograd only
    produces an inference graph when no output needs a gradient, so that role is the test."""
    return options.cuda_graphs != "off" and device.type == "cuda" and role == "inference"


def graph_device(args: Sequence[Any]) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- groups
def fuse_groups(gm: fx.GraphModule, specs) -> Tuple[fx.Graph, List[GroupCall]]:
    """A new graph where each group is one call (placed at its last node) plus getitems."""
    group_of: Dict[fx.Node, int] = {}
    for i, spec in enumerate(specs):
        for n in spec.nodes:
            group_of[n] = i
    last = {i: spec.nodes[-1] for i, spec in enumerate(specs)}
    calls = [GroupCall(i, extract_group(gm, spec, f"g{i}")) for i, spec in enumerate(specs)]
    new = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        i = group_of.get(node)
        if i is None:
            env[node] = new.node_copy(node, lambda n: env[n])
            continue
        if node is not last[i]:
            continue
        spec, call = specs[i], calls[i]
        inputs = _group_inputs(spec.nodes)
        outputs = _group_outputs(spec.nodes)
        call_node = new.call_function(call, tuple(env[x] for x in inputs))
        for k, out in enumerate(outputs):
            env[out] = new.call_function(_getitem, (call_node, k))
            env[out].meta.update(out.meta)
    return new, calls


def extract_group(gm: fx.GraphModule, spec, name: str) -> KernelGroup:
    sub = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for x in _group_inputs(spec.nodes):
        env[x] = sub.placeholder(x.name)
        env[x].meta.update(x.meta)
    for n in spec.nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in _group_outputs(spec.nodes)))
    # canonical names: identical layers give identical generated source, so they share one
    # tuning result and one compiled kernel instead of one per layer
    for i, x in enumerate(n for n in sub.nodes if n.op == "placeholder"):
        x._rename(f"in{i}")
    for j, n in enumerate(n for n in sub.nodes if n.op not in ("placeholder", "output")):
        n._rename(f"op{j}")
    sub_gm = fx.GraphModule(gm, sub)
    anchor = env[spec.anchor].name if spec.anchor is not None else None
    return KernelGroup(kind=spec.kind, gm=sub_gm, anchor=anchor, name=name)


def _group_inputs(nodes: List[fx.Node]) -> List[fx.Node]:
    inside = set(nodes)
    seen: Dict[fx.Node, None] = {}
    for n in nodes:
        for x in n.all_input_nodes:
            if x not in inside:
                seen.setdefault(x)
    return list(seen)


def _group_outputs(nodes: List[fx.Node]) -> List[fx.Node]:
    inside = set(nodes)
    return [n for n in nodes if any(u not in inside for u in n.users)]


def _getitem(values, index):
    return values[index]


_getitem.__name__ = "getitem"


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
    constants = _constants(gm)
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = args[node.meta["arg_index"]]
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
    report.kernels.append(call.kernel.describe())
    report.fallbacks.extend(fallbacks)
    return fallbacks


def inline_aten_groups(graph: fx.Graph, calls: List[GroupCall]) -> None:
    """Groups that run through ATen go back into the graph as plain ATen calls (no call overhead)."""
    for node in list(graph.nodes):
        call = node.target
        if not isinstance(call, GroupCall) or call.kernel is None or call.kernel.impl != "aten":
            continue
        env: Dict[fx.Node, fx.Node] = {}
        sub_inputs = iter(node.args)
        outs: Tuple[fx.Node, ...] = ()
        with graph.inserting_before(node):
            for sn in call.group.gm.graph.nodes:
                if sn.op == "placeholder":
                    env[sn] = next(sub_inputs)
                elif sn.op == "output":
                    outs = tuple(env[o] for o in sn.args[0])
                else:
                    env[sn] = graph.node_copy(sn, lambda a: env[a])
        for user in list(node.users):
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)


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


# --------------------------------------------------------------------------- runtime
class CompiledGraph:
    """What AOTAutograd calls: one engine per input-shape signature, built on first use.

    With declared dynamic dimensions (``Options.profiles``) a call whose sizes lie in the declared
    ranges runs the engine of its size bucket: inputs padded, outputs sliced back (see profiles).
    """

    def __init__(self, aten_gm: fx.GraphModule, *, role: str, name: str,
                 frozen: Optional[Sequence[bool]], options: Options, report_sink):
        self.aten_gm, self.role, self.name = aten_gm, role, name
        self.frozen, self.options, self.report_sink = frozen, options, report_sink
        self.engines: Dict[Tuple, Any] = {}
        # one build per input signature: threads calling a new shape at once wait for the first
        # one's engine (concurrent tunings would also skew each other's timings)
        self._build_lock = threading.Lock()
        self._warned_limit = False
        self._weights = frozenset(i for i, f in enumerate(frozen or ()) if f)
        self.profiles = (GraphProfiles.bind(aten_gm, options.profiles, role=role, name=name)
                         if options.profiles else None)

    def __call__(self, *args: Any) -> Any:
        plan = self.profiles.plan(args) if self.profiles is not None else None
        if plan is not None:
            padded = plan.pad(args)
            key = _signature(padded, self._weights)
            # a new bucket past the engine bound is not padded: it takes the bound's fallback
            if (key in self.engines or len(self.engines) < self.options.max_engines) \
                    and self._padding_checked(plan, args):
                return plan.unpad(self._run(padded, key, plan))
        return self._run(args, _signature(args, self._weights))

    def _padding_checked(self, plan: Plan, args: Sequence[Any]) -> bool:
        with preserve_rng(args):  # the check runs the graph: its random draws are not the user's
            return self.profiles.check(plan, args, self.aten_gm)

    def _run(self, args: Sequence[Any], key: Tuple, plan: Optional[Plan] = None) -> Any:
        engine = self.engines.get(key)
        if engine is None:
            with self._build_lock:
                engine = self.engines.get(key)
                if engine is None:
                    engine = self._build(args, key)
                    if plan is not None:
                        self.profiles.built(plan)
        if not isinstance(engine, Engine):
            return engine(*args)
        try:
            return engine(args)
        except WeightLayoutChanged as exc:
            # another model's weights under the same graph: every engine was built for the old
            # layout, so start again (never run a kernel on shapes it was not built for)
            log.info("compile_backend: %s: %s; rebuilding its engines", self.name, exc)
            self.engines.clear()
            return self._run(args, key, plan)

    def _build(self, args: Sequence[Any], key: Tuple) -> Any:
        if len(self.engines) >= self.options.max_engines:
            if not self._warned_limit:
                warnings.warn(
                    f"compile_backend: {self.name} has seen {len(self.engines)} input shapes "
                    f"(max_engines={self.options.max_engines}); further shapes run the ATen graph "
                    "without our kernels. Raise max_engines or declare the dynamic dimension.",
                    stacklevel=3)
                self._warned_limit = True
            return self.aten_gm
        report = self.report_sink(self.name, self.role)
        report.shapes.append(_describe(args))
        if self.profiles is not None:
            report.profiles = self.profiles.state  # shared: later calls update it
        start = time.perf_counter()
        try:
            # building runs the graph on the real inputs (tuning, validation): the random
            # numbers it draws must not shift the ones the user's call then draws
            with preserve_rng(args), _interpreter_lock():
                engine = compile_graph_cached(self.aten_gm, args, role=self.role, frozen=self.frozen,
                                              options=self.options, report=report)
        except Exception as exc:
            if self.options.fallback == "error":
                raise
            op = getattr(exc, "op", None) or "graph"
            warnings.warn(
                f"compile_backend: compiling {self.name} failed at {op} ({type(exc).__name__}: {exc}); "
                "running this graph eagerly. Pass options={'fallback': 'error'} to raise instead.",
                stacklevel=3)
            report.fallbacks.append({"op": str(op), "reason": f"{type(exc).__name__}: {exc}"})
            engine = self.aten_gm
        report.compile_s = time.perf_counter() - start
        self.engines[key] = engine
        return engine


def _interpreter_lock():
    """Builds run kernels (tuning, validation): under Triton's interpreter one thread at a time."""
    return INTERPRETER_LOCK if triton_interpret() else contextlib.nullcontext()


def preserve_rng(args: Sequence[Any]):
    """Restore the CPU generator, and that of every CUDA device among ``args``, on exit: work done
    on the user's behalf (building, checking) leaves the random stream where eager would."""
    devices = sorted({a.device.index or 0 for a in args
                      if isinstance(a, torch.Tensor) and a.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def _signature(args: Sequence[Any], weights: frozenset = frozenset()) -> Tuple:
    """The engine key of a call. Frozen weights are left out: this runs on every call, a model
    passes hundreds of them, and the engine itself checks each one's identity and version (and
    raises ``WeightLayoutChanged`` when a new one has another layout)."""
    out = []
    for i, a in enumerate(args):
        if i in weights:
            out.append(None)
        elif isinstance(a, torch.Tensor):
            out.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad))
        else:
            out.append(a if isinstance(a, (int, float, bool)) else type(a))
    return tuple(out)


def _describe(args: Sequence[Any]) -> str:
    shapes = [("x".join(map(str, a.shape)) or "scalar") + f":{str(a.dtype).replace('torch.', '')}"
              for a in args if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]
    return ", ".join(shapes[:6]) + (" …" if len(shapes) > 6 else "")


__all__ = ["compile_graph", "compile_graph_cached", "CompiledGraph", "op_name"]
