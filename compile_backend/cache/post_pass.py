"""What the fx passes made of a graph, stored in its engine-cache entry so a hit skips them.

The front of the pipeline (specialise, freeze, every fx pass) turns the ATen graph into a
:class:`PostPass`: the rewritten graph, the constant programs that recompute folded constants
from the frozen weights (refit runs them too), which arguments were frozen, the eager peak and
what the report says about the passes. A cold build stores it as ``files/graph.json`` (plain
JSON, see ``graph_file.py``) plus the constants the passes made that are neither weights nor
folded from them (``tensors``: e.g. the quantize pass's 0 and 1 scalars). A hit reads it back
and binds it to this call's weights: frozen arguments become constants again and the constant
programs run on them, so the hit equals a cold build with the stored weights followed by a
refit to the current ones (which is why the weights need not be in the key, as before).

Anything the format cannot hold raises ``Unstorable`` when writing (the entry then has no
graph, and hits re-run the passes); anything wrong when reading raises ``BadGraph`` (the caller
re-runs the passes and the report says why). Nothing read is executed as code.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.fx as fx

from ..fx_passes.constant_fold import FOLDED_PREFIX, FROZEN_PREFIX, ConstantProgram
from . import graph_file
from .graph_file import BadGraph, Unstorable

GRAPH_FILE = "graph.json"
POST_PASS_FORMAT = 1
_TENSOR_PREFIX = "constant."


@dataclasses.dataclass
class PostPass:
    """The front of the pipeline's result: the graph every later stage starts from."""

    gm: fx.GraphModule
    programs: List[ConstantProgram]
    bound: Dict[int, str]  # arg index -> constant name of each frozen argument
    eager_peak: int  # memory_plan.eager_peak_bytes of the graph before the passes
    passes: Dict[str, int]  # the report's lines: pass totals, per-rule counts, quantized layers
    rules: Dict[str, Dict[str, int]]
    quant: List[Dict[str, Any]]
    # the quantize pass's layer speed probes, for the report (kernels.autotune.Tuner.stats); not stored
    probes: Dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- writing
def dump(front: PostPass, aten_gm: fx.GraphModule) -> Tuple[Dict[str, bytes], Dict[str, torch.Tensor]]:
    """``(files, tensors)`` for the entry; raises Unstorable naming what cannot be stored."""
    aten_constants = {n.target for n in aten_gm.graph.nodes if n.op == "get_attr"}
    frozen = {name: i for i, name in front.bound.items()}
    folded = set()
    kinds: Dict[str, str] = {}
    tensors: Dict[str, torch.Tensor] = {}

    def classify(name: str) -> None:
        if name in kinds:
            return
        if "." in name:
            raise Unstorable(f"constant {name!r} lives in a submodule")
        value = getattr(front.gm, name, None)
        if name in frozen:
            kinds[name] = "frozen"
        elif name in folded:
            kinds[name] = "folded"
        elif name in aten_constants and _attr(aten_gm, name) is value:
            kinds[name] = "graph"  # a constant of the ATen graph: its digest is in the key
        elif isinstance(value, torch.Tensor) and value.layout == torch.strided:
            kinds[name] = "stored"  # made by a pass from no weight (fx_passes/README.md: weights fold)
            tensors[_TENSOR_PREFIX + name] = value
        else:
            raise Unstorable(f"constant {name!r} is a {type(value).__name__}")

    programs = []
    for program in front.programs:
        for name in program.inputs:
            classify(name)
        for name in program.outputs:
            if not name.startswith(FOLDED_PREFIX) or name in folded:
                raise Unstorable(f"constant program output {name!r}")
            folded.add(name)
        programs.append({"graph": graph_file.dump_graph(program.gm.graph, meta=False),
                         "inputs": list(program.inputs), "outputs": list(program.outputs)})
    for node in front.gm.graph.nodes:
        if node.op == "get_attr":
            classify(node.target)
    record = {
        "format": POST_PASS_FORMAT,
        "graph": graph_file.dump_graph(front.gm.graph),
        "programs": programs,
        "constants": kinds,
        "bound": sorted([i, name] for i, name in front.bound.items()),
        "eager_peak": int(front.eager_peak),
        "report": {"passes": front.passes, "rules": front.rules, "quant": front.quant},
    }
    try:
        text = json.dumps(record, separators=(",", ":"))  # key order kept: the report lists passes in order
    except (TypeError, ValueError) as exc:
        raise Unstorable(f"report data is not plain JSON: {exc}") from None
    return {GRAPH_FILE: text.encode()}, tensors


# --------------------------------------------------------------------------- reading
def load(files: Mapping[str, bytes], tensors: Mapping[str, torch.Tensor], aten_gm: fx.GraphModule,
         args: Sequence[Any], device: torch.device) -> PostPass:
    """The stored front bound to this call's weights; raises BadGraph naming the first problem."""
    blob = files.get(GRAPH_FILE)
    if blob is None:
        raise BadGraph("the entry holds no graph")
    try:
        record = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadGraph(f"{GRAPH_FILE} is not JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != POST_PASS_FORMAT:
        raise BadGraph(f"{GRAPH_FILE} is not of format {POST_PASS_FORMAT}")
    kinds, bound_list = record.get("constants"), record.get("bound")
    if not isinstance(kinds, dict) or not isinstance(bound_list, list) or not isinstance(record.get("programs"), list):
        raise BadGraph("bad constants, bound or programs")
    bound = _bound(bound_list, args)
    constants = _constants(kinds, bound, args, tensors, aten_gm, device)
    programs = []
    for item in record["programs"]:
        program = _program(item)
        missing = [n for n in program.inputs if n not in constants]
        if missing or any(kinds.get(n) != "folded" or n in constants for n in program.outputs):
            raise BadGraph(f"constant program reads {missing[:3]} or writes constants it may not")
        constants.update(_run(program, constants))
        programs.append(program)
    if any(name not in constants for name in kinds):
        raise BadGraph("a folded constant no program computes")
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = graph_file.load_graph(record.get("graph"), constants, FakeTensorMode())
    _check_placeholders(graph, args, bound)
    root = torch.nn.Module()
    for name in {n.target for n in graph.nodes if n.op == "get_attr"}:
        value = constants[name]
        if isinstance(value, torch.Tensor):
            root.register_buffer(name, value)
        else:
            setattr(root, name, value)
    gm = fx.GraphModule(root, graph)
    report = record.get("report")
    if not isinstance(report, dict) or not isinstance(report.get("passes"), dict) or \
            not isinstance(report.get("rules"), dict) or not isinstance(report.get("quant"), list):
        raise BadGraph("bad report data")
    peak = record.get("eager_peak")
    if not isinstance(peak, int) or isinstance(peak, bool) or peak < 0:
        raise BadGraph("bad eager peak")
    return PostPass(gm, programs, bound, peak, report["passes"], report["rules"], report["quant"])


def _bound(items: List[Any], args: Sequence[Any]) -> Dict[int, str]:
    bound: Dict[int, str] = {}
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and not isinstance(item[0], bool) and 0 <= item[0] < len(args)
                and item[1] == f"{FROZEN_PREFIX}{item[0]}" and isinstance(args[item[0]], torch.Tensor)):
            raise BadGraph(f"bad frozen argument {str(item)[:60]}")
        bound[item[0]] = item[1]
    return bound


def _constants(kinds: Mapping[str, Any], bound: Mapping[int, str], args: Sequence[Any],
               tensors: Mapping[str, torch.Tensor], aten_gm: fx.GraphModule, device: torch.device) -> Dict[str, Any]:
    """The constants known before the programs run: frozen weights, the ATen graph's, stored ones."""
    # frozen arguments as freeze binds them: the user's storage and version counter
    constants: Dict[str, Any] = {name: args[i].detach() for i, name in bound.items()}
    graph_constants = {n.target for n in aten_gm.graph.nodes if n.op == "get_attr"}
    frozen = set(bound.values())
    for name, kind in kinds.items():
        if not isinstance(name, str) or "." in name:
            raise BadGraph(f"bad constant name {str(name)[:60]!r}")
        if kind == "frozen":
            if name not in frozen:
                raise BadGraph(f"constant {name!r} is not a frozen argument")
        elif kind == "graph":
            if name not in graph_constants:
                raise BadGraph(f"constant {name!r} is not in the ATen graph")
            constants[name] = _attr(aten_gm, name)
        elif kind == "stored":
            value = tensors.get(_TENSOR_PREFIX + name)
            if value is None:
                raise BadGraph(f"constant {name!r} is not in the entry")
            constants[name] = value.to(device)
        elif kind != "folded" or not name.startswith(FOLDED_PREFIX):
            raise BadGraph(f"constant {name!r} of kind {str(kind)[:20]!r}")
    return constants


def _program(item: Any) -> ConstantProgram:
    if not isinstance(item, dict) or set(item) != {"graph", "inputs", "outputs"}:
        raise BadGraph("bad constant program")
    inputs, outputs = item["inputs"], item["outputs"]
    if not (isinstance(inputs, list) and isinstance(outputs, list)
            and all(isinstance(n, str) for n in inputs + outputs)):
        raise BadGraph("bad constant program inputs or outputs")
    graph = graph_file.load_graph(item["graph"], {}, None)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    if len(placeholders) != len(inputs) or not isinstance(result, (tuple, list)) or len(result) != len(outputs):
        raise BadGraph("constant program does not match its inputs or outputs")
    return ConstantProgram(fx.GraphModule(torch.nn.Module(), graph), list(inputs), list(outputs))


def _run(program: ConstantProgram, constants: Mapping[str, Any]) -> Dict[str, Any]:
    """The program's values, each owning its memory as constant folding leaves them (a refit
    writes folded constants in place: it must never write through a view into a weight)."""
    sources = {t.untyped_storage().data_ptr() for t in (constants[n] for n in program.inputs)
               if isinstance(t, torch.Tensor)}
    out = {}
    for name, value in program.run(dict(constants)).items():
        if isinstance(value, torch.Tensor) and (value._base is not None or
                                                value.untyped_storage().data_ptr() in sources):
            value = value.clone()
        out[name] = value
    return out


def _check_placeholders(graph: fx.Graph, args: Sequence[Any], bound: Mapping[int, str]) -> None:
    """Every placeholder is one argument (not a frozen one), with that argument's layout."""
    seen = set()
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        i = node.meta.get("arg_index")
        if not isinstance(i, int) or not 0 <= i < len(args) or i in seen or i in bound:
            raise BadGraph(f"placeholder {node.name}: bad arg_index {i!r}")
        seen.add(i)
        val, arg = node.meta.get("val"), args[i]
        if isinstance(arg, torch.Tensor) and (not isinstance(val, torch.Tensor) or (
                tuple(val.shape), tuple(val.stride()), val.dtype) != (tuple(arg.shape), tuple(arg.stride()), arg.dtype)):
            raise BadGraph(f"placeholder {node.name} does not match argument {i}")


def _attr(gm: fx.GraphModule, name: str) -> Any:
    obj: Any = gm
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["PostPass", "GRAPH_FILE", "dump", "load", "Unstorable", "BadGraph"]
