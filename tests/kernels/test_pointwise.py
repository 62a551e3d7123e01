"""Generated pointwise kernels (compile_backend/kernels/pointwise.py) against the ATen reference.

CPU tensors under the Triton interpreter; odd shapes (1x1, 3x5x7, 1823x781 with a large block
so the interpreter stays quick), fp32/fp16/bf16, broadcasting (incl. expanded stride-0 inputs),
non-contiguous and channels-last inputs, scalar inputs, several outputs. Tolerances per dtype
are ``groups.TOL`` (fp32 1e-5; fp16 1e-3 = one fp16 rounding flip; bf16 2**-6, see there).
"""
from __future__ import annotations


import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from groups import DTYPES, TOL, assert_matches, context, fake_prop, make_group, randn  # tests/kernels/groups.py
from compile_backend.kernels import launch, pointwise
from compile_backend.kernels.base import KernelGroup, Unsupported
from compile_backend.kernels.launch import PointwiseConfig
from compile_backend.kernels.pointwise import build_pointwise


def chain(x, b, s):
    """add -> gelu -> mul -> cast, the typical fused epilogue-style chain."""
    return (F.gelu(x + b) * s).to(torch.float32), torch.sigmoid(x) - b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7), (257, 33)], ids=str)
def test_chain_with_broadcast(shape, dtype):
    x = randn(*shape, dtype=dtype, seed=1)
    b = randn(shape[-1], dtype=dtype, seed=2)
    s = randn(*shape[:-1], 1, dtype=dtype, seed=3)
    group = make_group(chain, x, b, s)
    kernel = build_pointwise(group, context())
    assert kernel.kind == "pointwise" and kernel.impl == "triton"
    assert "def pointwise_kernel" in kernel.source and "tl.erf" in kernel.source
    # the fp32 output is a cast of a value computed in `dtype`: compare at that precision
    assert_matches(kernel, group, [x, b, s], tol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_odd_shape(dtype):
    x, y = randn(1823, 781, dtype=dtype, seed=4), randn(1823, 781, dtype=dtype, seed=5)
    group = make_group(lambda a, c: torch.relu(a * c + 1.0), x, y)
    kernel = build_pointwise(group, context(), PointwiseConfig(block=65536, num_warps=4))
    assert kernel.config == {"block": 65536, "num_warps": 4}
    assert_matches(kernel, group, [x, y])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    base = randn(41, 66, dtype=dtype, seed=6)
    x = base[:, ::2]  # strided columns
    y = randn(33, 41, dtype=dtype, seed=7).t()  # transposed
    z = randn(41, 1, dtype=dtype, seed=8).expand(41, 33)  # expanded: stride 0
    group = make_group(lambda a, c, d: (a * c + d, torch.exp(a - d)), x, y, z)
    assert_matches(build_pointwise(group, context()), group, [x, y, z])


def test_channels_last_output_layout():
    x = randn(2, 5, 7, 3).permute(0, 3, 1, 2)  # NCHW view of NHWC data: channels-last
    b = randn(1, 3, 1, 1)
    group = make_group(lambda a, c: torch.relu(a + c), x, b)
    kernel = build_pointwise(group, context())
    out = kernel(x, b)[0]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches(kernel, group, [x, b])
    # x and the output walk memory in the same order: both read/written flat
    assert "in_arg0_1_ptr + offs," in kernel.source and "out0_ptr + offs," in kernel.source


def test_contiguous_case_needs_no_index_math():
    x, b = randn(37, 29), randn(29)
    group = make_group(lambda a, c: a * c, x, b)
    src = build_pointwise(group, context()).source
    assert "tl.load(in_" in src and " + offs, mask=mask" in src  # x read flat
    assert "% 29" in src  # b broadcast along rows needs the column index (a literal size)


def test_views_of_inputs_run_on_host():
    x, b = randn(6, 10), randn(10)
    group = make_group(lambda a, c: (a.t() * c.unsqueeze(1).expand(10, 6),), x, b)
    assert any(n.target == torch.ops.aten.t.default for n in group.gm.graph.nodes)
    assert_matches(build_pointwise(group, context()), group, [x, b])


def test_view_of_computed_value_is_unsupported():
    x = randn(6, 10)
    group = make_group(lambda a: (a + 1).t() * 2, x)
    with pytest.raises(Unsupported, match="computed value"):
        build_pointwise(group, context())


def test_scalar_inputs_and_zero_dim_tensors():
    graph = fx.Graph()
    x = graph.placeholder("x")
    s = graph.placeholder("s")
    t = graph.placeholder("t")
    mul = graph.call_function(torch.ops.aten.mul.Tensor, (x, s))
    add = graph.call_function(torch.ops.aten.add.Tensor, (mul, t))
    graph.output((add, mul))
    gm = fx.GraphModule({}, graph)
    xv, tv = randn(7, 9, dtype=torch.float16), torch.tensor(0.25, dtype=torch.float32)
    fake_prop(gm, [xv, 1.5, tv])
    group = KernelGroup("pointwise", gm)
    kernel = build_pointwise(group, context())
    assert "s_s" in kernel.source
    assert_matches(kernel, group, [xv, 1.5, tv])
    assert_matches(kernel, group, [xv, -3.0, tv])  # the scalar is a runtime argument


def test_several_outputs_duplicates_and_passthrough():
    x = randn(5, 13, dtype=torch.bfloat16)
    group = make_group(lambda a: (a * 2, a, (a * 2), torch.tanh(a), a > 0), x)
    kernel = build_pointwise(group, context())
    outs = kernel(x)
    assert outs[1] is x
    assert_matches(kernel, group, [x])


def test_constant_only_output():
    x = randn(4, 6)
    group = make_group(lambda a: (torch.full_like(a, 3.0), torch.zeros_like(a, dtype=torch.int64)), x)
    assert_matches(build_pointwise(group, context()), group, [x])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_outputs_smaller_than_the_iteration_shape_are_written_once(dtype):
    """A QAT layer's 0-d and per-channel scales, stored beside the fake-quantized tensor that
    the same kernel computes from them (each written by the first element along its broadcast
    dims); odd shapes, a channels-last big output."""
    x = randn(3, 5, 4, 7, dtype=dtype, seed=7).to(memory_format=torch.channels_last)
    p, c = randn(1, seed=8).reshape(()).abs() + 0.1, randn(5, 1, 1, seed=9).abs() + 0.1

    def fn(x, p, c):
        s = (p * 0.5).clamp_min(1e-3)  # 0-d
        sc = c * s + 0.25  # per channel
        return torch.round(x / sc).clamp(-7, 7) * sc, s, sc, c[None] * s

    group = make_group(fn, x, p, c)
    kernel = build_pointwise(group, context())
    assert_matches(kernel, group, [x, p, c])
    assert [tuple(o.shape) for o in kernel(x, p, c)] == [(3, 5, 4, 7), (), (5, 1, 1), (1, 5, 1, 1)]


def test_runtime_strides_differ_from_traced_ones():
    x, y = randn(12, 20), randn(12, 20)
    group = make_group(lambda a, c: a - c, x, y)
    kernel = build_pointwise(group, context())
    yt = randn(20, 12, seed=9).t()
    assert_matches(kernel, group, [x, yt])
    with pytest.raises(ValueError, match="built for"):
        kernel(randn(3, 3), randn(3, 3))


def test_wide_indexing_path(monkeypatch):
    monkeypatch.setattr(pointwise, "INT32_MAX", 100)  # force 64-bit offsets on a small tensor
    x = randn(17, 19, dtype=torch.float16)
    group = make_group(lambda a: a * a, x)
    kernel = build_pointwise(group, context())
    assert "pid.to(tl.int64)" in kernel.source
    assert_matches(kernel, group, [x])


def test_same_group_compiles_once():
    x = randn(9, 11)
    group_a = make_group(lambda a: torch.sin(a) * 3, x)
    group_b = make_group(lambda a: torch.sin(a) * 3, x)
    ka = build_pointwise(group_a, context())
    before = launch.memo_stats()
    kb = build_pointwise(group_b, context())
    after = launch.memo_stats()
    assert ka.source == kb.source
    assert after[0] == before[0] and after[1] == before[1] + 1
    assert launch.load_source(ka.source) is launch.load_source(kb.source)


def test_empty_tensor():
    x = torch.empty(0, 5)
    group = make_group(lambda a: a + 1, x)
    assert build_pointwise(group, context())(x)[0].shape == (0, 5)


def test_config_validation():
    with pytest.raises(ValueError, match="block"):
        PointwiseConfig(block=1000)
    with pytest.raises(ValueError, match="num_warps"):
        PointwiseConfig(num_warps=3)


# ----------------------------------------------------------------------------- cat
def rotary(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "odd_rows"])
def test_cat_rotary_is_one_kernel(layout, dtype):
    """Rotary embeddings' ``cat((-x2, x1))`` inside the pointwise kernel: one masked load per
    piece, the ``neg`` applied to its piece's shifted load; pieces read through their views."""
    if layout == "contiguous":
        x = randn(2, 3, 5, 16, dtype=dtype, seed=20)
    elif layout == "transposed":  # a [B, S, H, D] projection seen as [B, H, S, D]
        x = randn(2, 5, 3, 16, dtype=dtype, seed=21).transpose(1, 2)
    else:
        x = randn(7, 3, 10, dtype=dtype, seed=22)
    cos, sin = randn(*x.shape[-2:], dtype=dtype, seed=23), randn(*x.shape[-2:], dtype=dtype, seed=24)
    group = make_group(rotary, x, cos, sin)
    kernel = build_pointwise(group, context())
    assert kernel.impl == "triton" and "cat along dim" in kernel.source
    assert_matches(kernel, group, [x, cos, sin], tol=TOL[dtype])


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cat_of_three_pieces_any_dim_with_a_chained_piece(dim):
    shapes = {0: [(2, 5), (3, 5), (1, 5)], 1: [(4, 3), (4, 1), (4, 6)], -1: [(4, 2), (4, 7), (4, 1)]}[dim]
    a, b, c = (randn(*s, seed=30 + i) for i, s in enumerate(shapes))
    group = make_group(lambda a, b, c: torch.relu(torch.cat((a, torch.exp(b * 2.0), c), dim)) + 1.0, a, b, c)
    kernel = build_pointwise(group, context())
    assert_matches(kernel, group, [a, b, c])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cat_computed_inside_a_bigger_iteration_shape(dtype):
    """The rotated key [B, H, 1, D] (rotate-half cat) computed inside the cache update
    [B, H, S, D] that selects it into its slot: the cat's pieces are read broadcast along S."""
    k, cos, sin = randn(2, 3, 1, 10, dtype=dtype, seed=21), randn(2, 1, 1, 10, seed=22), randn(2, 1, 1, 10, seed=23)
    cache, slot = randn(2, 3, 7, 10, dtype=dtype, seed=24), torch.arange(7).reshape(1, 1, 7, 1) == 4

    def fn(k, cos, sin, cache, slot):
        rotated = torch.cat((-k[..., 5:], k[..., :5]), dim=-1)
        return (torch.where(slot, (k * cos + rotated * sin).to(dtype), cache),)

    group = make_group(fn, k, cos, sin, cache, slot)
    assert_matches(build_pointwise(group, context()), group, [k, cos, sin, cache, slot])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_embedding_gathers_rows_and_joins_the_adds(dtype, index_dtype):
    """GPT-2's token + position embeddings as one kernel: each element loads its row index, then
    the weight at (index, column); the position rows broadcast over the batch; odd sizes."""
    wte, wpe = randn(37, 13, dtype=dtype, seed=31), randn(9, 13, dtype=dtype, seed=32)
    ids = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(33)).to(index_dtype)
    pos = torch.arange(9).to(index_dtype).unsqueeze(0)
    group = make_group(lambda w, p, i, q: (torch.nn.functional.embedding(i, w) + torch.nn.functional.embedding(q, p),),
                       wte, wpe, ids, pos)
    kernel = build_pointwise(group, context())
    assert kernel.impl == "triton" and "embedding" in " ".join(kernel.ops)
    assert_matches(kernel, group, [wte, wpe, ids, pos])


def test_table_indexed_by_position_is_a_gather():
    """A rotary table read at each row's position, ``cos[position]`` (aten.index.Tensor with one
    index tensor): the same gather as an embedding, here times the rotated values."""
    table, q = randn(17, 8, seed=36), randn(3, 1, 8, seed=37)
    position = torch.tensor([[4], [16], [0]])
    group = make_group(lambda t, p, q: (t[p] * q,), table, position, q)
    kernel = build_pointwise(group, context())
    assert "aten.index" in " ".join(kernel.ops)
    assert_matches(kernel, group, [table, position, q])


def test_table_indexed_by_a_negative_position_counts_from_the_end():
    """``table[[-2]]`` is the second row from the end, as in eager (Falcon's key head,
    qkv[..., [-2], :]); the kernel read 0 for it before (its validation fell back to ATen)."""
    table, q = randn(6, 32, seed=38), randn(1, 4, 32, seed=39)
    group = make_group(lambda t, p, q: (t[p] * q,), table, torch.tensor([-2]), q)
    kernel = build_pointwise(group, context())
    assert "aten.index" in " ".join(kernel.ops)
    for index in ([-2], [-6], [5], [0]):
        assert_matches(kernel, group, [table, torch.tensor(index), q])


def test_embedding_of_a_strided_weight_and_a_scalar_index():
    w = randn(11, 20, seed=34).t()  # [20, 11] with strides (1, 20)
    idx = torch.tensor(7)
    group = make_group(lambda w, i: (torch.nn.functional.embedding(i, w) * 2.0,), w, idx)
    assert_matches(build_pointwise(group, context()), group, [w, idx])


def test_embedding_index_out_of_range_reads_zero_not_memory():
    """Eager raises (CUDA: a device assert); a kernel cannot raise, so an index outside the
    table reads 0 instead of memory beyond the weight. Computed indices are refused."""
    w = randn(5, 6, seed=35)
    group = make_group(lambda w, i: (torch.ops.aten.embedding(w, i),), w, torch.tensor([[0, 4, 1, 2]]))
    out = build_pointwise(group, context()).fn(w, torch.tensor([[0, 4, 5, -1]]))[0]
    assert torch.equal(out[0, :2], w[[0, 4]]) and torch.equal(out[0, 2:], torch.zeros(2, 6))
    computed = make_group(lambda w, i: (torch.ops.aten.embedding(w, i.clamp(0, 4)),), w, torch.tensor([[0, 4]]))
    with pytest.raises(Unsupported, match="computed weight or computed indices"):
        build_pointwise(computed, context())


def test_cat_as_the_output_and_unsupported_pieces():
    a, b = randn(3, 4, seed=40), randn(3, 4, seed=41)
    group = make_group(lambda a, b: torch.cat((a, b), 0), a, b)  # a copy kernel
    assert_matches(build_pointwise(group, context()), group, [a, b])
    two_inputs = make_group(lambda a, b: torch.cat((a * b, b), 1), a, b)  # a piece reading two tensors
    with pytest.raises(Unsupported, match="cat of a computed value"):
        build_pointwise(two_inputs, context())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_written_over_its_input_stores_only_the_selected_elements(dtype):
    """``where(c, a, x)`` written into ``x`` itself (an input written in place, input_writes.py):
    the kernel loads no ``x`` and stores only where ``c`` holds; the result equals the reference,
    elsewhere ``x`` keeps its values bit for bit. Into a fresh tensor it is the plain kernel."""
    cache, k = randn(2, 3, 37, 5, dtype=dtype, seed=11), randn(2, 3, 1, 5, dtype=dtype, seed=12)
    position, slots = torch.tensor([13]), torch.arange(37).view(1, 1, -1, 1)  # slots: a folded constant
    group = make_group(lambda c, x, p, s: torch.where(s == p.view(1, 1, 1, 1), x * 2.0 + 1.0, c),
                       cache, k, position, slots)
    kernel = build_pointwise(group, context())
    (expected,) = group.reference(cache, k, position, slots)
    (fresh,) = kernel(cache, k, position, slots)
    torch.testing.assert_close(fresh, expected, **TOL[dtype])
    launcher = kernel.fn
    assert list(launcher.keepers) == [0]
    mine = cache.clone()
    (got,) = kernel(mine, k, position, slots, out=(mine,))
    assert got.data_ptr() == mine.data_ptr()
    torch.testing.assert_close(mine, expected, **TOL[dtype])
    keep = torch.ones(37, dtype=torch.bool)
    keep[13] = False
    assert torch.equal(mine[:, :, keep], cache[:, :, keep])  # untouched, not rewritten
    sources = [launch.source for key, launch in launcher._launches.items() if key[1] == (0,)]
    assert len(sources) == 1 and "tl.zeros([BLOCK]" in sources[0]
    assert sources[0].count("tl.load(") == 3  # k, the position and the slots; not the cache
