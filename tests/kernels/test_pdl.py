"""Programmatic Dependent Launch (kernels/pdl.py, ``Options.pdl``): kernels built with it wait for
their predecessor before their first memory access and then let the next kernel launch; the
option is ignored where the device or Triton lacks it. Triton's interpreter has no grid-dependency
intrinsics, so on the CPU the sources are checked (they parse, compile, and wait first); running
them is the GPU test's part."""
from __future__ import annotations

import ast

import pytest
import torch

from groups import context, make_group, randn  # tests/kernels/groups.py
import compile_backend
from compile_backend.kernels import pdl
from compile_backend.kernels.base import KernelContext
from compile_backend.kernels.launch import load_source
from compile_backend.kernels.pointwise import build_pointwise
from compile_backend.kernels.reduction import build_reduction

WAIT, SIGNAL = pdl.ENTRY


def _pdl_context() -> KernelContext:
    ctx = context()
    ctx.pdl = True  # as on an H100/H200 with options pdl=True: sources only, never launched here
    return ctx


def _body(source: str, kernel: str):
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == kernel)
    return [ast.unparse(s) for s in fn.body]


def test_entry_goes_first_in_the_kernel_body_whatever_its_signature():
    source = ("import triton\n\n@triton.jit\ndef k(a,\n      b, BLOCK: tl.constexpr):\n"
              "    '''doc'''\n    pid = tl.program_id(0)\n    x = tl.load(a + pid)\n\n\ndef other():\n    pass\n")
    assert _body(pdl.with_entry(source, "k"), "k")[1:3] == [WAIT, SIGNAL]  # after the docstring
    assert _body(pdl.with_entry(source, "k", after=1), "k")[2:4] == [WAIT, SIGNAL]  # after the program id
    with pytest.raises(ValueError, match="no function"):
        pdl.with_entry(source, "missing")


def test_option_is_ignored_without_a_hopper_gpu():
    ctx = KernelContext(options=compile_backend.Options(pdl=True), device=torch.device("cpu"), interpret=True)
    assert ctx.pdl is False and pdl.launch_kwargs(False) == {}
    assert pdl.launch_kwargs(True) == {"launch_pdl": True}
    assert not pdl.available(torch.device("cpu"))
    with pytest.raises(ValueError, match="'pdl' must be True or False"):
        compile_backend.Options(pdl="yes")


def test_pointwise_and_reduction_kernels_wait_before_any_load():
    x, b = randn(5, 33, seed=1), randn(33, seed=2)
    pointwise = build_pointwise(make_group(lambda a, c: torch.tanh(a + c), x, b), _pdl_context())
    body = _body(pointwise.source, "pointwise_kernel")
    assert body[0].startswith("pid = ") and body[1:3] == [WAIT, SIGNAL], body[:4]
    assert pointwise.fn.pdl
    reduction = build_reduction(make_group(lambda a: torch.softmax(a, -1), x, kind="reduction"), _pdl_context())
    assert _body(reduction.source, "reduction_kernel")[:2] == [WAIT, SIGNAL]
    plain = build_pointwise(make_group(lambda a, c: torch.tanh(a + c), x, b), context())
    assert WAIT not in plain.source and not plain.fn.pdl


def test_combined_pointwise_parts_each_wait_first():
    """Independent parts launched as one kernel (pointwise_combo): every part's body waits."""
    gen = torch.Generator().manual_seed(0)
    a, c, idx = torch.randn(5, 7, generator=gen), torch.randn(6, generator=gen), torch.randint(0, 9, (4,), generator=gen)
    group = make_group(lambda a, c, i: (a * 2 + 1, torch.where(i[:, None] > 2, c, -c)), a, c, idx)
    kernel = build_pointwise(group, _pdl_context())
    assert kernel.config.get("combo") == 2 and kernel.fn.pdl
    for part in ("part0", "part1"):  # a part is given its program id: its body starts waiting
        assert _body(kernel.source, part)[:2] == [WAIT, SIGNAL]
    load_source(kernel.source)  # the combined module compiles


def test_decode_gemv_waits_after_its_first_weights_and_before_any_other_load():
    from compile_backend.kernels import gemv
    from compile_backend.kernels import gemm_template as tpl

    source, name = gemv.render(gemv.PLAIN_X, gemv.PLAIN_EPILOGUE, torch.float16, torch.float16)
    with_entry = pdl.with_entry(source, name, after=gemv.PDL_AFTER)
    body = _body(with_entry, name)
    wait = body.index(WAIT)
    assert body[wait + 1] == SIGNAL and "first_weights(" in "\n".join(body[:wait])
    # before the wait: indices and the first step's constant weights only: no other load, no store
    assert not any(word in line for line in body[:wait] for word in ("tl.load", "tl.store", "atomic", "x_at("))
    tpl.load_kernel(with_entry, name)


@pytest.mark.gpu
def test_gpu_decode_step_with_pdl_equals_plain_launches(engines, tmp_path):
    """The zoo's in-place decode step (GEMVs, the cache update, flash-decoding, norms) built with
    PDL gives the plain launches' logits and caches exactly, under CUDA graphs, over three steps."""
    from compile_backend import zoo

    if not pdl.available(torch.device("cuda")):
        pytest.skip("PDL needs compute capability 9.0 and a Triton with launch_pdl")
    model, inputs = zoo.get("llama_decode_inplace", "tiny", dtype=torch.float16, device="cuda")
    results = {}
    for use in (False, True):
        torch._dynamo.reset()
        ids, position, *caches = [t.clone() for t in inputs]
        step = torch.compile(model, backend="compile_backend",
                             # untuned: both builds pick the same configs (same summation order)
                             options={"pdl": use, "autotune": "off", "cache_dir": str(tmp_path / str(use))})
        with torch.no_grad():
            logits = [step(ids, position + i, *caches)[0].clone() for i in range(3)]
        results[use] = (logits, caches)
    for a, b in zip(results[False][0] + results[False][1], results[True][0] + results[True][1]):
        assert torch.equal(a, b)
    assert any(WAIT in (call.kernel.source or "") for e in engines for call in e.calls if call.kernel is not None)
