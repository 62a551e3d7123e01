"""compose_view: one as_strided view of a tensor for what views of its contiguous copy read.
Checked against real data: whenever it answers, the strided view must read exactly the values
the view chain reads from the copy; where it refuses, no claim is made (the copy stays)."""
import itertools
import random

import torch

from compile_backend.fx_passes.strided_views import compose_view, merged_dims


def _answer(src, view):
    """compose_view for ``view`` (a view of ``src.contiguous()``), as an as_strided of src."""
    got = compose_view(src.shape, src.stride(), src.storage_offset(), view.shape, view.stride(),
                       view.storage_offset())
    if got is None:
        return None
    stride, offset = got
    return src.as_strided(view.shape, stride, offset)


def _ids(shape):
    return torch.arange(1, 1 + torch.Size(shape).numel()).reshape(shape)


def test_multihead_attention_packed_projection():
    L, B, H, D = 5, 3, 4, 8
    E = H * D
    proj = _ids((L, B, 3 * E))  # the in-projection's output
    src = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2)  # [3, L, B, E]
    copy = src.contiguous()
    for i in range(3):
        view = copy[i].view(L, B * H, D).transpose(0, 1).view(B, H, L, D)
        strided = _answer(src, view)
        assert strided is not None, "the packed q/k/v views are one strided view each"
        assert torch.equal(strided, view)
        assert strided.stride() == (3 * E, D, 3 * B * E, 1)


def test_a_flatten_of_a_transpose_is_refused():
    src = _ids((4, 6)).t()  # [6, 4], strides (1, 6)
    view = src.contiguous().view(24)
    assert _answer(src, view) is None  # rows of the copy are not one stride apart in src


def test_merged_dims():
    assert merged_dims((2, 1, 3, 4), (12, 99, 4, 1)) == [(24, 1)]
    assert merged_dims((3, 5), (1, 3)) == [(3, 1), (5, 3)]


def _random_source(rng):
    shape = [rng.choice((1, 2, 3, 4)) for _ in range(rng.randint(1, 4))]
    base = _ids([s + rng.choice((0, 0, 1)) for s in shape])
    src = base[tuple(slice(0, s) for s in shape)]  # maybe not the whole base: gaps
    perm = list(range(len(shape)))
    rng.shuffle(perm)
    return src.permute(perm)


def _random_views(copy, rng):
    """A few view chains of the contiguous copy: select/slice/transpose/view/unsqueeze."""
    out = []
    for _ in range(6):
        v = copy
        for _ in range(rng.randint(1, 4)):
            op = rng.choice(("select", "slice", "transpose", "flatten", "split", "unsqueeze"))
            if op == "select" and v.dim() > 1 and v.shape[0] > 0:
                v = v.select(rng.randrange(v.dim()), 0) if rng.random() < 0.5 else v[v.shape[0] - 1]
            elif op == "slice" and v.dim() and v.shape[-1] > 1:
                v = v[..., 1:]
            elif op == "transpose" and v.dim() > 1:
                a, b = rng.sample(range(v.dim()), 2)
                v = v.transpose(a, b)
            elif op == "flatten" and v.dim() > 1:
                try:
                    v = v.view(*v.shape[:-2], v.shape[-2] * v.shape[-1])
                except RuntimeError:
                    pass
            elif op == "split" and v.dim() and v.shape[-1] in (4, 6):
                v = v.view(*v.shape[:-1], 2, v.shape[-1] // 2)
            elif op == "unsqueeze":
                v = v.unsqueeze(rng.randrange(v.dim() + 1))
        out.append(v)
    return out


def test_every_answer_reads_what_the_chain_reads():
    rng = random.Random(0)
    answered = 0
    for _ in range(400):
        src = _random_source(rng)
        for view in _random_views(src.contiguous(), rng):
            strided = _answer(src, view)
            if strided is not None:
                answered += 1
                assert torch.equal(strided, view), (src.shape, src.stride(), view.shape, view.stride())
    assert answered > 300  # the check is not vacuous


def test_exhaustive_small_permutations():
    # every permutation of a [2, 3, 4] source, every single select/transpose view of its copy
    for perm in itertools.permutations(range(3)):
        src = _ids((2, 3, 4)).permute(perm)
        copy = src.contiguous()
        views = [copy.select(d, i) for d in range(3) for i in range(copy.shape[d])]
        views += [copy.transpose(a, b) for a in range(3) for b in range(a + 1, 3)]
        views += [copy.reshape(-1)[: copy.numel()].view(copy.shape)]
        for view in views:
            strided = _answer(src, view)
            assert strided is not None and torch.equal(strided, view)
