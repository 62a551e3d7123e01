"""``python -m compile_backend bench ...``: the command line, the model to run, the run.

See the package docstring (``compile_backend.bench``) for what is measured and recorded.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .measure import (FIRST_CALL_TAG, compile_peer, log, make_call, run_peer, snapshot, strict_fp32,
                      time_first_call, to_device)
from .peers import DEFAULT_PEERS, PEERS, PRECISIONS, UsageError, parse_options, parse_peers
from .results import ResultsFile, add_ratios, environment, format_table

PROG = "python -m compile_backend bench"


# ----------------------------------------------------------------------------- arguments

def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Benchmark a model against torch.compile peers.")
    p.add_argument("--model", default="resnet50",
                   help="zoo name (mlp, resnet50, bert, gpt2, vit) or module:function returning (model, inputs)")
    p.add_argument("--size", choices=("tiny", "base"), default=None,
                   help="zoo size (default: base on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the zoo's)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="dtype the model and float inputs are cast to; also compile_backend's precision")
    p.add_argument("--options", default=None,
                   help="compile_backend options: JSON object or comma-separated k=v pairs")
    p.add_argument("--compare", default=",".join(DEFAULT_PEERS),
                   help=f"comma-separated peers among {', '.join(PEERS)}; "
                        "compile_backend[k=v,...] adds options to that peer alone")
    p.add_argument("--iters", type=int, default=50, help="timed calls per peer")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls after the first one")
    p.add_argument("--warm-compile", action="store_true",
                   help="also time the first call in a fresh subprocess with the filled caches")
    p.add_argument("--out", default=None, help="results JSON: a list of records, appended to")
    p.add_argument("--plot", default=None, help="write a PNG of latency and speedup here")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--cache-root", default=None,
                   help="keep the per-peer cache directories here (default: a temporary directory)")
    p.add_argument("--warm-timeout", type=float, default=600.0, help="seconds for the warm subprocess")
    # internal: the warm-compile subprocess only times the first call and prints JSON
    p.add_argument("--_first-call-only", dest="first_call_only", action="store_true",
                   help=argparse.SUPPRESS)
    return p


def check_args(args) -> None:
    """Everything that can be checked before a model is built or compiled: a typo in an option
    must not surface as a peer's ``BackendCompilerFailed`` after minutes of work."""
    from ..options import Options

    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be a positive integer, got {args.batch}")
    if args.iters < 1 or args.warmup < 0:
        raise UsageError("--iters must be >= 1 and --warmup >= 0")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here (torch "
                         f"{torch.__version__}); use --device cpu or run on a GPU machine")
    try:
        Options.from_mapping({"precision": args.precision, **args.user_options})
    except ValueError as exc:
        raise UsageError(f"--options: {exc}") from None
    if ":" not in args.model:
        from .. import zoo

        if args.model not in zoo.NAMES + zoo.LLM_NAMES:
            raise UsageError(f"--model {args.model!r} is neither a zoo model ({', '.join(zoo.NAMES + zoo.LLM_NAMES)}) "
                             "nor module:function returning (model, inputs)")


# ----------------------------------------------------------------------------- model and inputs

def load_model(spec: str, size: str, batch: Optional[int], device: str, seed: int):
    """(fp32 model in eval mode, fp32 inputs, outputs-are-logits or None when unknown)."""
    from .. import zoo

    if ":" not in spec:
        model, inputs = zoo.get(spec, size, batch=batch, device=device, seed=seed)
        return model, inputs, zoo.spec(spec, size).logits
    model, inputs = call_factory(spec, dict(size=size, batch=batch, device=device, seed=seed))
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    model = model.to(device).float().eval()
    inputs = tuple(to_device(t, device, torch.float32) for t in inputs)
    return model, inputs, None


def call_factory(spec: str, wanted: Dict[str, Any]) -> Tuple[torch.nn.Module, Any]:
    """``module:function`` -> what the function returns for the arguments it declares among
    ``wanted``; every failure is a UsageError naming the cause and the fix."""
    module_name, fn_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (ImportError, or the module itself failing)
        raise UsageError(f"--model {spec}: cannot import module {module_name!r} ({type(exc).__name__}: "
                         f"{exc}); it must be importable from the current directory or PYTHONPATH") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"--model {spec}: module {module_name!r} has no function {fn_name!r}; "
                         "give module:function where the function returns (model, inputs)")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        result = fn(**{k: v for k, v in wanted.items() if k in params and v is not None})
    except Exception as exc:  # noqa: BLE001  (the user's code: report it, do not dump our stack)
        raise UsageError(f"--model {spec}: {fn_name}() raised {type(exc).__name__}: {exc}; "
                         "fix the factory (call it in Python to see the traceback)") from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and isinstance(result[0], torch.nn.Module)):
        raise UsageError(f"--model {spec}: {fn_name}() must return (model, inputs) with model an "
                         f"nn.Module, got {type(result).__name__}")
    return result[0], result[1]


def batch_of(inputs: Sequence[Any]) -> Optional[int]:
    first = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return int(first.shape[0]) if first is not None else None


def first_call_only(args) -> int:
    """Internal (warm-compile subprocess): build, compile ``args.compare``, time the first call."""
    model, inputs, _ = load_model(args.model, args.size, args.batch, args.device, args.seed)
    dtype = PRECISIONS[args.precision]
    model = model.to(dtype)
    inputs = tuple(to_device(t, args.device, dtype) for t in inputs)
    peer = parse_peers(args.compare)[0]
    with torch.no_grad():
        call = make_call(peer, compile_peer(peer, model, args.user_options), inputs)
        seconds, _ = time_first_call(call, args.device)
    print(FIRST_CALL_TAG + json.dumps({"first_call_s": seconds}), flush=True)
    return 0


# ----------------------------------------------------------------------------- the run

def run(args) -> List[dict]:
    peers = parse_peers(args.compare)
    dtype = PRECISIONS[args.precision]
    results = ResultsFile(args.out)
    fp32_model, fp32_inputs, logits = load_model(args.model, args.size, args.batch, args.device, args.seed)
    log(f"{args.model} ({args.size}) on {args.device}: fp32 eager reference ...")
    with torch.no_grad(), strict_fp32():
        ref = snapshot(fp32_model(*fp32_inputs))
    model = copy.deepcopy(fp32_model).to(dtype).eval()
    inputs = tuple(to_device(t, args.device, dtype) for t in fp32_inputs)
    del fp32_model, fp32_inputs
    base = dict(model=args.model, size=args.size, batch=args.batch or batch_of(inputs),
                precision=args.precision, iters=args.iters, warmup=args.warmup,
                **environment(args.device, commit=args.commit))
    records: List[dict] = []
    own_root = args.cache_root is None
    cache_root = tempfile.mkdtemp(prefix="bench-caches-") if own_root else args.cache_root
    try:
        for peer in peers:
            records.append(run_peer(peer, model, inputs, ref, logits, args, cache_root, base))
            add_ratios(records)
            results.write(records)
    finally:
        if own_root:
            shutil.rmtree(cache_root, ignore_errors=True)
    print(f"\n{args.model} size={args.size} batch={base['batch']} precision={args.precision} "
          f"device={base['device']} torch={base['torch']} triton={base['triton']}")
    print(format_table(records), flush=True)
    if args.plot:
        from .plot import plot_records

        plot_records(records, args.plot)
        log(f"plot written to {args.plot}")
    return records


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size is None:
        args.size = "base" if args.device.startswith("cuda") else "tiny"
    try:
        try:
            args.user_options = parse_options(args.options)
        except ValueError as exc:  # a JSON error or a pair without "="
            raise UsageError(f"--options: {exc}") from None
        parse_peers(args.compare)
        check_args(args)
        if args.first_call_only:
            return first_call_only(args)
        records = run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if all("error" in r for r in records) else 0
