"""canonical_gathers: rotary spellings (GPT-J's gather of a repeated table and stack of halves,
Falcon's cos[..., pos, :]) become the row gather and the cat the pointwise generator takes, with
the same values; forms outside the rules' conditions stay."""
import pytest
import torch
import torch.nn as nn

from compile_backend.fx_passes.gathers import canonical_gathers
from compile_backend.fx_passes.partition import fusable_cat, fusable_gather
from fx_passes.graphs import checked_run, count, ctx, inference_graph


def _rewritten(model, *inputs):
    t = inference_graph(model, *inputs)
    with torch.no_grad():
        expected = model(*inputs)
    counts = canonical_gathers(t.gm, ctx())
    t.gm.graph.lint()
    got = checked_run(t)
    got = got[0] if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # indexing and copies only: the same bits
    return t, counts


def _ops(t, name):
    return [n for n in t.gm.graph.nodes if n.op == "call_function" and str(n.target).startswith(f"aten.{name}.")]


class GPTJRotary(nn.Module):
    """transformers' GPT-J: the sin/cos table repeated over the batch, gathered by the position
    repeated over the table's width, and rotate_every_two's stack((-x2, x1), -1)."""

    def __init__(self, positions=40, width=8):
        super().__init__()
        self.register_buffer("table", torch.randn(positions, width))

    def forward(self, x, position_ids):
        table = self.table.repeat(position_ids.shape[0], 1, 1)
        index = position_ids.unsqueeze(-1).repeat(1, 1, table.shape[-1])
        sincos = torch.gather(table, 1, index)
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        x1, x2 = x[..., ::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return x * cos.repeat_interleave(2, dim=-1) + rotated * sin.repeat_interleave(2, dim=-1)


def test_gptj_rotary_becomes_a_row_gather_and_a_cat():
    t, counts = _rewritten(GPTJRotary().eval(), torch.randn(1, 3, 8), torch.tensor([[5, 6, 7]]))
    assert counts["stack_as_cat"] == 1 and counts["gather_as_index"] == 1 and counts["repeat_as_expand"] >= 2
    assert counts["index_as_row_gather"] == 1
    assert not _ops(t, "stack") and not _ops(t, "gather") and not _ops(t, "repeat")
    (gather,) = _ops(t, "index")
    assert fusable_gather(gather)
    assert all(fusable_cat(n) for n in _ops(t, "cat"))


class FalconRows(nn.Module):
    def forward(self, cos, position):
        return cos[:, :, position] * 2.0


def test_index_after_size_one_dims_is_a_row_gather():
    t, counts = _rewritten(FalconRows().eval(), torch.randn(1, 1, 6, 32), torch.tensor([4]))
    assert counts["index_as_row_gather"] == 1
    (gather,) = _ops(t, "index")
    assert fusable_gather(gather) and gather.args[0].meta["val"].shape == (6, 32)


def test_index_after_a_real_batch_dim_stays():
    t, counts = _rewritten(FalconRows().eval(), torch.randn(2, 1, 6, 32), torch.tensor([4, 1]))
    assert counts["index_as_row_gather"] == 0 and len(_ops(t, "index")) == 1


class SinusoidalRows(nn.Module):
    """XGLM's positions: a sinusoidal table's rows by computed position ids (index_select)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(20, 16))

    def forward(self, ids):
        return self.table.index_select(0, (ids + 2).view(-1)).view(*ids.shape, -1) * 2.0


def test_index_select_is_a_row_gather():
    t, counts = _rewritten(SinusoidalRows().eval(), torch.tensor([[3, 0, 7], [1, 1, 17]]))
    assert counts["index_select_as_index"] == 1 and not _ops(t, "index_select")
    (gather,) = _ops(t, "index")
    assert fusable_gather(gather)


class ConstantRows(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.register_buffer("rows", rows)  # a frozen constant (Falcon's: a tensor literal)

    def forward(self, qkv):
        return qkv[:, :, self.rows] * 2.0


@pytest.mark.parametrize("rows,rewritten", [([-2], True), ([0, 2, 4], True), ([3, 4, 5], True), ([3, 1], False),
                                            ([1, 1], False)], ids=["falcon-key", "step2", "run", "falling", "repeat"])
def test_index_by_constant_rising_positions_is_a_slice(rows, rewritten):
    t, counts = _rewritten(ConstantRows(torch.tensor(rows)).eval(), torch.randn(2, 1, 6, 32))
    assert counts["index_as_slice"] == int(rewritten)
    assert bool(_ops(t, "index")) is not rewritten


class Stack(nn.Module):
    def __init__(self, dim, pieces):
        super().__init__()
        self.dim, self.pieces = dim, pieces

    def forward(self, x):
        return torch.stack([x * (i + 1) for i in range(self.pieces)], dim=self.dim) + 1


@pytest.mark.parametrize("dim,pieces,rewritten", [(-1, 2, True), (1, 4, True), (0, 2, False), (-1, 5, False)],
                         ids=["last", "middle4", "dim0-stays", "five-stay"])
def test_stack_becomes_a_cat_off_dim_0(dim, pieces, rewritten):
    t, counts = _rewritten(Stack(dim, pieces).eval(), torch.randn(3, 5, 7))
    assert counts["stack_as_cat"] == int(rewritten)
    assert bool(_ops(t, "stack")) is not rewritten


class Repeat(nn.Module):
    def __init__(self, reps, then=True):
        super().__init__()
        self.reps, self.then = reps, then

    def forward(self, x):
        y = x.repeat(*self.reps)
        return y * 2.0 if self.then else y


@pytest.mark.parametrize("shape,reps,rewritten", [((4, 1), (1, 6), True), ((4, 5), (2, 1, 1), True),
                                                  ((4, 2), (1, 3), False)], ids=["size1", "lead", "real-copy"])
def test_repeat_of_size_one_dims_is_an_expand(shape, reps, rewritten):
    t, counts = _rewritten(Repeat(reps).eval(), torch.randn(*shape))
    assert counts["repeat_as_expand"] == int(rewritten)


def test_a_returned_repeat_stays_a_copy():
    t, counts = _rewritten(Repeat((1, 6), then=False).eval(), torch.randn(4, 1))
    assert counts["repeat_as_expand"] == 0


class Gather(nn.Module):
    def forward(self, x, idx):
        return torch.gather(x, 1, idx) + 0.5


def test_gather_by_a_varying_index_stays():
    x = torch.randn(2, 9, 4)
    idx = torch.randint(0, 9, (2, 3, 4))  # a different row per element: a real gather
    t, counts = _rewritten(Gather().eval(), x, idx)
    assert counts["gather_as_index"] == 0 and len(_ops(t, "gather")) == 1


def test_training_graphs_are_left_alone():
    from compile_backend.fx_passes import REGISTRY

    t = inference_graph(Stack(-1, 2).eval(), torch.randn(3, 5, 7))
    REGISTRY.run(t.gm, ctx(training=True), until="select_rows_first")
    assert _ops(t, "stack")
    REGISTRY.run(t.gm, ctx(), until="select_rows_first")
    assert not _ops(t, "stack")
