"""cache/graph_file.py: post-pass graphs stored as JSON data and read back as untrusted input.

A graph round-trips with its arguments (node refs, exact floats, dtypes, devices, lists and
tuples, keywords) and the meta later stages read; anything outside the closed set of targets,
or data that is malformed, is refused (BadGraph) and nothing is resolved beyond torch.ops of
the allowed namespaces. The stages after the passes read no node meta the format drops.
"""
import json
import math
import operator
import pathlib
import re

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from compile_backend.cache import graph_file
from compile_backend.cache.graph_file import BadGraph, Unstorable

aten = torch.ops.aten


def _graph():
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta.update(val=torch.empty(4, 6, device="meta"), arg_index=0)
    w = g.get_attr("w")
    w.meta["val"] = torch.empty(6, 3, device="meta")
    mm = g.create_node("call_function", aten.mm.default, (x, w), name="mm")
    mm.meta["val"] = torch.empty(4, 3, device="meta")
    mm.meta["cb_probe_seeds"] = ("triton 128x64x64 w4 s3 g8", "triton 64x64x64 w4 s4 g8")  # (kernels/template.seeded)
    c = g.create_node("call_function", aten.clamp.default, (mm, float("-inf"), 0.1), name="clamp")
    c.meta["val"] = torch.empty(4, 3, device="meta")
    c.meta["cb_approximate_tanh"] = True  # (a flag the kernels read: fx_passes/quant_math.py)
    cast = g.create_node("call_function", aten._to_copy.default, (c,),
                         {"dtype": torch.float16, "device": torch.device("cpu")}, name="_to_copy")
    parts = g.create_node("call_function", aten.split_with_sizes.default, (cast, [1, 2], 1), name="split_with_sizes")
    parts.meta["val"] = (torch.empty(4, 1, dtype=torch.float16, device="meta"),
                         torch.empty(4, 2, dtype=torch.float16, device="meta"))
    first = g.call_function(operator.getitem, (parts, 0))
    g.output((first, mm))
    return g


def _load(data, constants=None):
    return graph_file.load_graph(data, constants if constants is not None else {"w": torch.zeros(6, 3)},
                                 FakeTensorMode())


def test_round_trip_keeps_code_arguments_and_meta():
    g = _graph()
    data = json.loads(json.dumps(graph_file.dump_graph(g)))  # through JSON text, as stored
    back = _load(data)
    assert back.python_code("self").src == g.python_code("self").src
    nodes = {n.name: n for n in back.nodes}
    assert nodes["clamp"].args[1] == float("-inf") and nodes["clamp"].args[2] == 0.1  # exact floats
    assert nodes["_to_copy"].kwargs == {"dtype": torch.float16, "device": torch.device("cpu")}
    assert isinstance(nodes["split_with_sizes"].args[1], list)
    assert nodes["x"].meta["arg_index"] == 0
    assert nodes["clamp"].meta["cb_approximate_tanh"] is True and "cb_approximate_tanh" not in nodes["mm"].meta
    assert nodes["mm"].meta["cb_probe_seeds"] == ("triton 128x64x64 w4 s3 g8", "triton 64x64x64 w4 s4 g8")
    val = nodes["mm"].meta["val"]
    assert isinstance(val, torch._subclasses.FakeTensor) and val.shape == (4, 3) and val.stride() == (3, 1)
    assert [v.dtype for v in nodes["split_with_sizes"].meta["val"]] == [torch.float16] * 2


def test_nan_float_round_trips():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(aten.add.Tensor, (x, float("nan"))))
    back = _load(json.loads(json.dumps(graph_file.dump_graph(g))), {})
    add = next(n for n in back.nodes if n.op == "call_function")
    assert math.isnan(add.args[1])


def test_unknown_callable_is_unstorable():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.relu, (x,)))  # a Python function, not an operator overload
    with pytest.raises(Unstorable, match="relu"):
        graph_file.dump_graph(g)


def _mutated(change):
    data = json.loads(json.dumps(graph_file.dump_graph(_graph())))
    change(data["nodes"])
    return data


def _node(nodes, name):
    return next(n for n in nodes if n["name"] == name)


HOSTILE = {
    "python builtin": lambda ns: _node(ns, "mm").update(target="builtins.exec"),
    "other namespace": lambda ns: _node(ns, "mm").update(target="os.system.default"),
    "dunder": lambda ns: _node(ns, "mm").update(target="aten.__class__.default"),
    "unknown op": lambda ns: _node(ns, "mm").update(target="aten.not_an_op_at_all.default"),
    "forward reference": lambda ns: _node(ns, "mm").update(args=[{"n": 0}, {"n": 6}]),
    "keyword injection": lambda ns: _node(ns, "_to_copy").update(kwargs={"x=__import__('os')": None}),
    "unknown constant": lambda ns: _node(ns, "w").update(target="not_a_constant"),
    "bad name": lambda ns: _node(ns, "mm").update(name="mm; import os"),
    "unknown meta": lambda ns: _node(ns, "mm")["meta"].update(stack_trace="x"),
    "bad tensor meta": lambda ns: _node(ns, "mm")["meta"].update(val={"tensor": [[-1], [1], 0, "float32", "cpu", True]}),
    "bad dtype": lambda ns: _node(ns, "_to_copy")["kwargs"].update(dtype={"dtype": "os"}),
    "bad device": lambda ns: _node(ns, "_to_copy")["kwargs"].update(device={"device": "cuda:0; rm"}),
    "output not last": lambda ns: ns.reverse(),
    "extra field": lambda ns: _node(ns, "mm").update(code="print(1)"),
    "unknown tag": lambda ns: _node(ns, "mm").update(args=[{"eval": "1"}, {"n": 1}]),
    "deep nesting": lambda ns: _node(ns, "split_with_sizes").update(
        args=[{"n": 4}, json.loads("[" * 0 + '{"l":' * 40 + "[]" + "}" * 40), 1]),
}


@pytest.mark.parametrize("change", sorted(HOSTILE))
def test_hostile_graph_is_refused(change):
    with pytest.raises(BadGraph):
        _load(_mutated(HOSTILE[change]))


@pytest.mark.parametrize("data", [None, [], {"format": 99, "nodes": []}, {"format": 1, "nodes": "x"},
                                  {"format": 1, "nodes": [1, 2]}, {"format": 1, "nodes": []}])
def test_malformed_graph_is_refused(data):
    with pytest.raises(BadGraph):
        _load(data)


def test_later_stages_read_only_stored_meta():
    """The partitioner, kernel builders, memory plan, engine and pipeline read node meta by
    these keys only: a new key read there must be stored too (graph_file.STORED_META), or a
    cache hit would build from a graph without it."""
    root = pathlib.Path(__file__).resolve().parents[2] / "compile_backend"
    files = [root / "fx_passes" / "partition.py", root / "fx_passes" / "partition_graph.py", root / "groups.py",
             root / "memory_plan.py",
             root / "engine.py", root / "pipeline.py", root / "quant" / "standalone.py",
             *sorted((root / "kernels").glob("*.py"))]
    access = re.compile(r"""(\w+)\.meta(?:\[|\.get\()\s*(?:(['"])(\w+)\2)?""")
    not_nodes = {"entry", "made", "aten_gm", "gm"}  # cache entries' and graph modules' meta, not a node's
    for path in files:
        for m in access.finditer(path.read_text()):
            if m.group(1) in not_nodes:
                continue
            assert m.group(3) is not None, f"{path.name} reads node meta by a key that is not a literal"
            assert m.group(3) in graph_file.STORED_META, (path.name, m.group(3))
