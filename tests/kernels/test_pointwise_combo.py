"""Independent pointwise parts as one launch (kernels/pointwise_combo.py; the partitioner's
``merge_independent_pointwise``): each part's generated kernel becomes a device function, a
wrapper hands out the program ranges. Against the group's ATen graph, under the interpreter."""
import pytest
import torch

import compile_backend
from compile_backend.kernels.base import KernelContext, KernelGroup
from compile_backend.kernels.select import choose_kernel


def _group(fn, inputs):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = make_fx(fn)(*inputs)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    return KernelGroup("pointwise", gm)


def _ctx():
    return KernelContext(options=compile_backend.Options(), device=torch.device("cpu"), interpret=True)


def _parts(a, b, c, idx, table):
    """Four shapes: a rotate-half cat, a product, an embedding gather, a broadcast select."""
    rot = torch.cat([-b[..., 3:], b[..., :3]], -1) * c
    return a * 2 + 1, rot, table[idx] * 3, torch.where(idx[:, None] > 2, c, -c)


def test_parts_of_four_shapes_run_as_one_launch():
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(5, 7, generator=gen), torch.randn(2, 3, 6, generator=gen), torch.randn(6, generator=gen),
              torch.randint(0, 9, (4,), generator=gen), torch.randn(9, 6, generator=gen))
    group = _group(_parts, inputs)
    kernel, fallbacks = choose_kernel(group, inputs, _ctx())
    assert (kernel.impl, fallbacks, kernel.config["combo"]) == ("triton", [], 4)
    for got, want in zip(kernel(*inputs), group.reference(*inputs)):
        assert torch.equal(got, want)  # the same fp32 arithmetic, element by element
    assert "def combo_kernel(" in kernel.source


def test_outputs_written_into_given_tensors_and_an_empty_part():
    """out= (the engine's memory plan) per group output; a part with no elements launches nothing."""
    gen = torch.Generator().manual_seed(1)
    a, b, e = torch.randn(3, 4, generator=gen), torch.randn(7, generator=gen), torch.randn(0, 5, generator=gen)
    group = _group(lambda a, b, e: (a + 1, b * b, e - 1), (a, b, e))
    kernel, _ = choose_kernel(group, (a, b, e), _ctx())
    assert kernel.supports_out
    outs = [torch.empty_strided(s, st, dtype=d)
            for s, st, d in kernel.out_layouts]
    got = kernel.fn(a, b, e, out=outs)
    assert all(g is o for g, o in zip(got, outs))
    for g, w in zip(got, group.reference(a, b, e)):
        assert torch.equal(g, w)


def test_the_partitioner_merges_small_independent_neighbours_only():
    from compile_backend.fx_passes import partition
    from compile_backend.fx_passes.partition_merge import COMBO_MAX_NUMEL
    from fx_passes.graphs import inference_graph

    class Model(torch.nn.Module):
        def forward(self, x, y, big):
            return torch.sin(x) + 1, torch.cos(y) * 2, torch.sin(x).sum() + torch.cos(big).sum()

    x, y = torch.randn(4, 8), torch.randn(3, 5)
    big = torch.randn(COMBO_MAX_NUMEL + 1)
    gm = inference_graph(Model().eval(), x, y, big).gm
    groups = partition(gm)
    combos = [g for g in groups if g.kind == "pointwise" and {"sin", "cos"} <= set(g.ops)]
    assert combos, [(g.kind, g.ops) for g in groups]
    assert all(g.ops.count("cos") == 1 for g in combos)  # the big cos stays a kernel of its own


def test_many_one_shape_parts_join_into_one():
    """A decoder's per-layer token counts: many independent ``position + 1`` of one shape beside
    parts of other shapes join into one part, not one per layer (HF Llama 1.1B on an H100: 25
    parts were more than a combined launch takes, and the whole group ran in ATen)."""
    gen = torch.Generator().manual_seed(2)
    layers = 22
    inputs = (torch.randn(5, 7, generator=gen), torch.randn(2, 3, 6, generator=gen), torch.randn(6, generator=gen),
              torch.randint(0, 9, (4,), generator=gen), torch.randn(9, 6, generator=gen), torch.tensor([511]))

    def step(a, b, c, idx, table, position):
        return (*_parts(a, b, c, idx, table), *[position + 1 for _ in range(layers)])

    group = _group(step, inputs)
    kernel, fallbacks = choose_kernel(group, inputs, _ctx())
    assert (kernel.impl, fallbacks, kernel.config["combo"]) == ("triton", [], 5)
    for got, want in zip(kernel(*inputs), group.reference(*inputs)):
        assert torch.equal(got, want)


def test_more_parts_than_one_launch_takes_run_as_several():
    """Eleven parts of eleven shapes (none joins another): two combined launches, not ATen."""
    from compile_backend.kernels.pointwise_combo import MAX_PARTS

    gen = torch.Generator().manual_seed(3)
    inputs = tuple(torch.randn(i + 1, 5, generator=gen) for i in range(MAX_PARTS + 3))
    group = _group(lambda *xs: tuple(torch.cat([x[:, 2:], -x[:, :2]], -1) * (i + 2) for i, x in enumerate(xs)), inputs)
    kernel, fallbacks = choose_kernel(group, inputs, _ctx())
    assert (kernel.impl, fallbacks, kernel.config["combo"], kernel.config["launches"]) == ("triton", [], MAX_PARTS + 3, 2)
    for got, want in zip(kernel(*inputs), group.reference(*inputs)):
        assert torch.equal(got, want)
    outs = [torch.empty_strided(s, st, dtype=d) for s, st, d in kernel.out_layouts]
    got = kernel.fn(*inputs, out=outs)
    assert all(g is o for g, o in zip(got, outs))
