"""One QAT training step through our backend beside the float step of its peers (issue #19's
GPU row): forward, backward and optimizer step, side by side in one process.

    python -m benchmarks.qat_step_bench --cases hf_bert:16 tv_resnet50:32 --out $OUT/qat_step.json

Per case, each peer trains its own copy of the same model (same weights, same batch):

* ``eager``, ``inductor`` (``torch.compile`` default), ``compile_backend``: the float step;
* ``cb-qat-int8``, ``cb-qat-fp8``: ``quant.prepare_qat`` (static, scales seeded from the batch,
  learned), compiled with our backend: the step the issue times against Inductor's float step
  (target <= 1.3x);
* ``inductor-qat-int8``: the same prepared model under Inductor, for reference.

A step is ``zero_grad``, ``loss = mean(out * w)`` over the model's float outputs (``w`` fixed
random: every layer gets a gradient; the loss does not matter for speed), ``backward``, ``SGD(momentum=0.9).step``. Every record: median / p20 /
p80 of ``--iters`` synchronised steps after ``--warmup`` (compiles happen there; the first step's
seconds are recorded), and for our peers the report's groups, fallbacks and, for QAT, where the
fake quantization ran (``GraphReport.fake_quant``). Before timing, one step's gradients of our
float step are compared with eager's, dropout off in both (cosine and relative error per
parameter, worst reported): the issue's "gradients of the float path match eager". ``--autocast bf16`` (default
on CUDA) runs every peer under ``torch.autocast``; the models stay fp32 (mixed-precision training
as users run it). ``--device cpu --size tiny`` checks the script on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import contextlib
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from compile_backend.bench.measure import (clean_slate, first_and_steady, flat_tensors, fresh_compiler_caches,
                                           record_failure)
from compile_backend.bench.results import ResultsFile, environment

from . import real_models

FLOAT_PEERS = ("eager", "inductor", "compile_backend")
QAT_PEERS = {"cb-qat-int8": ("compile_backend", "int8"), "cb-qat-fp8": ("compile_backend", "fp8"),
             "inductor-qat-int8": ("inductor", "int8")}
ALL_PEERS = FLOAT_PEERS + tuple(QAT_PEERS)


def log(message: str) -> None:
    print(f"[qat_step] {message}", file=sys.stderr, flush=True)


_LOSS_WEIGHTS: Dict[Any, torch.Tensor] = {}


def loss_of(out: Any) -> torch.Tensor:
    """mean(out * w) over the float outputs, w fixed random per output shape: every layer gets
    a gradient (mean(out ** 2) of a LayerNorm's output has next to none through the norm)."""
    total = 0.0
    for t in (t for t in flat_tensors(out) if t.is_floating_point()):
        key = (tuple(t.shape), t.device)
        if key not in _LOSS_WEIGHTS:
            gen = torch.Generator().manual_seed(len(_LOSS_WEIGHTS))
            _LOSS_WEIGHTS[key] = torch.randn(t.shape, generator=gen).to(t.device)
        total = total + (t.float() * _LOSS_WEIGHTS[key]).mean()
    return total


def autocast(args) -> contextlib.AbstractContextManager:
    if args.autocast == "off":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    return torch.autocast(args.device.split(":")[0], dtype=dtype)


def prepared(model: torch.nn.Module, peer: str, inputs: Sequence[Any], cache_dir: str) -> torch.nn.Module:
    """``model`` itself (float peers) or prepared for QAT in place, scales seeded from the batch."""
    if peer not in QAT_PEERS:
        return model
    from compile_backend import quant

    cfg = quant.QuantConfig(precision=QAT_PEERS[peer][1], calibrator="max")
    quant.prepare_qat(model.eval(), cfg, [tuple(inputs)], progress=False, cache_dir=cache_dir)  # ranges as in eval
    return model.train()


def compiled(model: torch.nn.Module, peer: str, cache_dir: str, report: Any) -> Callable:
    kind = QAT_PEERS[peer][0] if peer in QAT_PEERS else peer
    if kind == "eager":
        return model
    if kind == "inductor":
        return torch.compile(model)
    from compile_backend.backend import compile_backend as backend_fn

    options = {"cache_dir": cache_dir}
    return torch.compile(model, backend=lambda gm, ins: backend_fn(gm, ins, options=options, report=report))


def make_step(model: torch.nn.Module, run: Callable, inputs: Sequence[Any], args) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(args):
            loss = loss_of(run(*inputs))
        loss.backward()
        opt.step()
    return step


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose dropout draws nothing (p = 0): compiled and eager consume random numbers
    differently, so gradients are compared without it (the timed steps keep it)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for attr in ("dropout_prob", "attention_dropout", "dropout_p"):  # functional dropout in HF / zoo attention
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return twin


def gradients(model: torch.nn.Module, run: Callable, inputs: Sequence[Any], args) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with autocast(args):
        loss = loss_of(run(*inputs))
    loss.backward()
    return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def compare_gradients(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor],
                      exact: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """Worst per-parameter cosine and relative error (norm of the difference / norm of eager's).
    A gradient that is zero in exact arithmetic is rounding noise in both (an attention key's
    bias: softmax ignores a per-row shift), so parameters whose eager gradient is below 1e-6 of
    the largest are only counted (``near_zero``), with their largest absolute difference. With
    ``exact`` (eager's gradients without autocast), so are the parameters whose autocast
    gradient in eager is itself more than 50% off the fp32 one (``rounding_dominated``: under
    bf16 the key bias's zero gradient is noise of a few percent of its terms)."""
    worst_cos, worst_rel, where = 1.0, 0.0, None
    missing = sorted(set(ref) - set(got))
    scale = max((float(r.norm()) for r in ref.values()), default=0.0)
    near_zero, near_zero_diff, noisy = [], 0.0, []
    for name, r in ref.items():
        if name not in got:
            continue
        if float(r.norm()) < 1e-6 * scale:
            near_zero.append(name)
            near_zero_diff = max(near_zero_diff, float((got[name] - r).abs().max()))
            continue
        if exact is not None and name in exact and relative_error(r, exact[name]) > 0.5:
            noisy.append(name)
            continue
        g = got[name].flatten()
        r = r.flatten()
        norms = float(g.norm() * r.norm())
        cos = float(g @ r) / norms if norms > 0 else float(torch.equal(g, r))
        rel = relative_error(g, r)
        if rel > worst_rel:
            worst_rel, where = rel, name
        worst_cos = min(worst_cos, cos)
    out = {"worst_cosine": worst_cos, "worst_relative_error": worst_rel, "worst_parameter": where,
           "parameters": len(ref), "missing": missing, "near_zero": near_zero,
           "near_zero_max_abs_diff": near_zero_diff, "largest_gradient_norm": scale, "rounding_dominated": noisy}
    if exact is not None and where is not None and where in exact:  # eager's own autocast error there
        out["eager_relative_error_vs_fp32_there"] = relative_error(ref[where].flatten(), exact[where].flatten())
    return out


def report_summary(report: Any) -> Optional[Dict[str, Any]]:
    if report is None or not report.graphs:
        return None
    return {g.role: {"groups": g.groups_by_kind(), "fake_quant": g.fake_quant,
                     "fallbacks": sorted({f["op"] for f in g.fallbacks})} for g in report.graphs}


def run_peer(peer: str, model, inputs, args, root: str, eager_grads) -> Dict[str, Any]:
    from compile_backend.report import Report

    record: Dict[str, Any] = {"backend": peer}
    clean_slate(args.device)
    cache = os.path.join(root, peer)
    try:
        with fresh_compiler_caches(cache):
            mine = copy.deepcopy(model)
            t0 = time.perf_counter()
            mine = prepared(mine, peer, inputs, os.path.join(cache, "cb"))
            record["prepare_s"] = time.perf_counter() - t0
            report = Report() if "compile_backend" in (peer, QAT_PEERS.get(peer, ("",))[0]) else None
            run = compiled(mine, peer, os.path.join(cache, "cb"), report)
            if peer == "compile_backend" and eager_grads is not None:  # the float path vs eager
                twin = without_dropout(mine)
                twin_run = compiled(twin, peer, os.path.join(cache, "cb"), None)
                record["gradients_vs_eager"] = compare_gradients(gradients(twin, twin_run, inputs, args), *eager_grads)
                if args.autocast != "off":  # deep BatchNorm nets: bf16 rounding dominates most
                    # gradients (all but ResNet-50's last layers), so fp32 against fp32 as well
                    fp32 = argparse.Namespace(**{**vars(args), "autocast": "off"})
                    record["gradients_vs_eager_fp32"] = compare_gradients(gradients(twin, twin_run, inputs, fp32),
                                                                          eager_grads[1])
                for key in ("gradients_vs_eager", "gradients_vs_eager_fp32"):
                    if key in record:
                        g = record[key]
                        log(f"{peer}: {key} worst cosine {g['worst_cosine']:.6f} over "
                            f"{g['parameters'] - len(g['near_zero']) - len(g['rounding_dominated'])} parameters")
                del twin, twin_run
            step = make_step(mine, run, inputs, args)
            timed = first_and_steady(step, args.iters, args.warmup, args.device)
            record["first_step_s"] = timed.pop("first_s")
            record.update(timed, report=report_summary(report))
        log(f"{peer}: {record['median_ms']:.3f} ms per step, first step {record['first_step_s']:.1f} s")
    except Exception as exc:  # noqa: BLE001  (one failing peer must not end the case)
        record_failure(record, exc, lambda m: log(f"{peer}: {m}"))
    finally:
        torch._dynamo.reset()
    return record


def run_case(case: str, peers: Sequence[str], args, results: ResultsFile, records: List[dict], env: dict) -> None:
    loaded = real_models.load_case(case, args.size, args.device, log)
    if loaded is None:
        return
    name, batch, model, inputs, _ = loaded
    model.train()
    twin = without_dropout(model)
    eager_grads = None
    if "compile_backend" in peers:  # under the run's autocast, and without it (the rounding floor)
        eager_grads = (gradients(twin, twin, inputs, args),
                       gradients(twin, twin, inputs, argparse.Namespace(**{**vars(args), "autocast": "off"})))
    del twin
    case_records = []
    with tempfile.TemporaryDirectory() as root:
        for peer in peers:
            record = run_peer(peer, model, inputs, args, root, eager_grads)
            record.update(case=case, model=name, batch=batch, autocast=args.autocast, kind="qat_step", **env)
            case_records.append(record)
            records.append(record)
            results.write(records)
    ratios(case_records)
    results.write(records)


def ratios(case_records: List[dict]) -> None:
    """Each QAT peer's step time over Inductor's float step (the issue's target: <= 1.3)."""
    inductor = next((r.get("median_ms") for r in case_records if r["backend"] == "inductor"), None)
    for r in case_records:  # our float step too: the QAT steps' overhead is theirs over it
        if (r["backend"] in QAT_PEERS or r["backend"] == "compile_backend") and inductor and r.get("median_ms"):
            r["vs_inductor_float"] = r["median_ms"] / inductor


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qat_step_bench", description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["hf_bert:16", "tv_resnet50:32"])
    p.add_argument("--peers", default=",".join(ALL_PEERS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("tiny", "base"), default="base")
    p.add_argument("--autocast", choices=("off", "bf16", "fp16"), default=None)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.autocast is None:
        args.autocast = "bf16" if args.device.startswith("cuda") else "off"
    peers, unknown = real_models.parse_peers(args.peers, ALL_PEERS)
    if unknown:
        p.error(f"unknown peer(s) {unknown}; choose among {', '.join(ALL_PEERS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("needs a CUDA device (or --device cpu --size tiny to check the script)")
        return 2
    env = environment(args.device, commit=os.environ.get("COMMIT"))
    results = ResultsFile(args.out)
    records: List[dict] = []
    for case in args.cases:
        run_case(case, peers, args, results, records, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
