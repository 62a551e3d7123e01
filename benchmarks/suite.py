"""The benchmark suite: every zoo base model, then models from ``transformers`` / ``torchvision``
(``benchmarks.real_models``, skipped where absent), at fp16 against all five peers, in parts.

    python -m benchmarks.suite --parts                 # list the parts
    python -m benchmarks.suite --part 3 --out $OUT/suite.json
    python -m benchmarks.suite --part 1 --peers eager,compile_backend

Each part is sized to finish inside ten minutes on one H100: Inductor's max-autotune compiles
take minutes per model, so that peer has parts of its own. Every case (model, batch) runs in its
own subprocess (``python -m benchmarks ...``): all peers of a case share one process, model and
inputs, as the runner requires, while a peer that wedges the GPU (an illegal memory access makes
every later CUDA call fail) cannot spoil the other cases. A part has a time budget: a case gets
what is left of it as its timeout, and peers that did not get to run are recorded with an
``error`` saying so, so the results file always says what was and was not measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

from compile_backend.bench.peers import PEERS, parse_peers
from compile_backend.bench.results import ResultsFile, environment

from . import real_models

FAST_PEERS = ("eager", "inductor", "inductor-reduce-overhead", "compile_backend")
SLOW_PEERS = ("inductor-max-autotune",)
#: the engine without CUDA graphs, beside the launch-bound cases (issue #7 compares both)
NO_GRAPHS = ("compile_backend[cuda_graphs=off]",)
DEFAULT_OUT = os.path.join("benchmarks", "results", "suite.json")
#: the checkout this file is in: its cases run ``python -m benchmarks`` from there
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISION = "fp16"


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # a zoo name, or a name of benchmarks.real_models.REAL (models no one here wrote)
    batch: int

    def __post_init__(self) -> None:
        from compile_backend import zoo

        if self.model not in real_models.REAL:
            zoo.spec(self.model, "base")  # validates the name
        if self.batch < 1:
            raise ValueError(f"batch must be positive, got {self.batch}")

    @property
    def model_arg(self) -> str:
        """The runner's ``--model`` (and its records' ``model``)."""
        return real_models.model_spec(self.model) if self.model in real_models.REAL else self.model

    def missing(self) -> str:
        """Why the case cannot run here ('' when it can): a real model's absent packages."""
        if self.model not in real_models.REAL:
            return ""
        absent = real_models.missing_packages(self.model)
        return f"skipped: {', '.join(absent)} not installed" if absent else ""


@dataclasses.dataclass(frozen=True)
class Part:
    cases: Tuple[Case, ...]
    peers: Tuple[str, ...]

    def __post_init__(self) -> None:
        parse_peers(",".join(self.peers))


MLP, RN32, RN1 = Case("mlp", 2048), Case("resnet50", 32), Case("resnet50", 1)
BERT, GPT2, VIT = Case("bert", 16), Case("gpt2", 8), Case("vit", 32)
# from the GPU image's transformers / torchvision (skipped where absent)
HF_BERT, HF_BERT1, HF_GPT2 = Case("hf_bert", 16), Case("hf_bert", 1), Case("hf_gpt2", 8)
TV_RN32, TV_RN1, TV_VIT = Case("tv_resnet50", 32), Case("tv_resnet50", 1), Case("tv_vit_b_16", 32)
HF_LLAMA, HF_T5, TV_MOBILENET = Case("hf_llama", 8), Case("hf_t5_encoder", 16), Case("tv_mobilenet_v3", 32)

# Numbered from 1. Budget guesses per case on an H100 (cold compiles, fresh caches, plus the
# warm-compile subprocess per compiled peer): small graphs ~1-2 min, transformers ~3-5 min for
# the four fast peers; max-autotune ~3-5 min per model.
PARTS: Tuple[Part, ...] = (
    Part((RN1,), FAST_PEERS + NO_GRAPHS),
    Part((MLP, RN32), FAST_PEERS),
    Part((BERT,), FAST_PEERS + NO_GRAPHS),
    Part((GPT2,), FAST_PEERS),
    Part((VIT,), FAST_PEERS),
    Part((MLP, RN32), SLOW_PEERS),
    Part((RN1, BERT), SLOW_PEERS),
    Part((GPT2,), SLOW_PEERS),
    Part((VIT,), SLOW_PEERS),
    # 10..: models no one here wrote (issue #17's table, then one model per other family)
    Part((HF_BERT, HF_BERT1), FAST_PEERS + NO_GRAPHS),
    Part((HF_GPT2,), FAST_PEERS),
    Part((TV_RN1, TV_RN32), FAST_PEERS),
    Part((TV_VIT,), FAST_PEERS),
    Part((HF_LLAMA, HF_T5), FAST_PEERS),
    Part((TV_MOBILENET,), FAST_PEERS),
    Part((HF_BERT, HF_BERT1), SLOW_PEERS),
    Part((HF_GPT2,), SLOW_PEERS),
    Part((TV_RN1, TV_RN32), SLOW_PEERS),
    Part((TV_VIT,), SLOW_PEERS),
)


def case_command(case: Case, peers: Sequence[str], args) -> List[str]:
    cmd = [sys.executable, "-m", "benchmarks", "--model", case.model_arg, "--size", args.size,
           "--batch", str(case.batch), "--precision", PRECISION, "--compare", ",".join(peers),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--device", args.device,
           "--out", args.out]
    if args.warm_compile:
        cmd.append("--warm-compile")
    if args.commit:
        cmd += ["--commit", args.commit]
    if args.options:
        cmd += ["--options", args.options]
    return cmd


def _load(out: str) -> list:
    if not os.path.exists(out) or os.path.getsize(out) == 0:
        return []
    with open(out) as f:
        return json.load(f)


def run_case(case: Case, peers: Sequence[str], args, timeout: float) -> str:
    """Run one case's subprocess; returns why it stopped early, or '' when it finished."""
    cmd = case_command(case, peers, args)
    print(f"\n=== {case.model} batch {case.batch}: {', '.join(peers)} (timeout {timeout:.0f} s)", flush=True)
    print(" ".join(cmd), flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its warm-compile child
        proc.wait()
        return f"part time budget ({args.budget_s:.0f} s) ran out during this case"
    return "" if rc == 0 else f"the case's process exited with status {rc}"


def record_missing(case: Case, peers: Sequence[str], reason: str, args, first_new: int) -> None:
    """Peers with no record (never reached or killed) get an error record, so nothing is silent.
    ``first_new``: how many records the file held before this case ran."""
    records = _load(args.out)
    done = {r["backend"] for r in records[first_new:] if r.get("model") == case.model_arg}
    missing = [p for p in peers if p not in done]
    if not missing:
        return
    # the device's name from an earlier record: this parent process never initialises CUDA, so
    # it holds no GPU memory while the cases run
    name = next((r["device"] for r in reversed(records) if r.get("device")), args.device)
    results = ResultsFile(args.out)
    base = dict(model=case.model_arg, size=args.size, batch=case.batch, precision=PRECISION,
                **environment(args.device, device_name=name, commit=args.commit))
    results.write([dict(base, backend=p, error=f"not measured: {reason}") for p in missing])


def run_part(index: int, args) -> int:
    part = PARTS[index - 1]
    peers = [p for p in part.peers if not args.peers or p in args.peers]
    if not peers:
        print(f"part {index}: none of its peers ({', '.join(part.peers)}) is in --peers", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    for case in part.cases:
        remaining = deadline - time.monotonic()
        first_new = len(_load(args.out))
        reason = case.missing() or (run_case(case, peers, args, remaining) if remaining > 5
                                    else "part time budget spent")
        if reason:
            print(f"--- {case.model} batch {case.batch}: {reason}", flush=True)
            record_missing(case, peers, reason, args, first_new)
    if args.plot:
        from compile_backend.bench.plot import plot_records

        plot_records(_load(args.out), args.plot)
    return 0


def describe_parts() -> str:
    lines = []
    for i, part in enumerate(PARTS, 1):
        cases = ", ".join(f"{c.model} b{c.batch}" for c in part.cases)
        lines.append(f"part {i}: {cases}  [{', '.join(part.peers)}]")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", type=int, help=f"which part to run (1..{len(PARTS)})")
    p.add_argument("--parts", action="store_true", help="list the parts and exit")
    p.add_argument("--peers", default=None, help=f"restrict to these peers (comma list among {', '.join(PEERS)})")
    p.add_argument("--out", default=DEFAULT_OUT, help="results JSON (appended to)")
    p.add_argument("--plot", default=None, help="plot every record in --out to this PNG after the part")
    p.add_argument("--budget-s", type=float, default=570.0, help="wall-clock budget for the part")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("tiny", "base"), default="base",
                   help="zoo size (tiny: a quick smoke test of the suite itself)")
    p.add_argument("--options", default=None, help="compile_backend options (as for the runner)")
    p.add_argument("--commit", default=None, help="commit to record where the tree has no .git (the GPU machine)")
    p.add_argument("--no-warm-compile", dest="warm_compile", action="store_false",
                   help="skip the warm-compile subprocess per compiled peer")
    args = p.parse_args(argv)
    if args.parts or args.part is None:
        print(describe_parts())
        return 0 if args.parts else 2
    if not 1 <= args.part <= len(PARTS):
        print(f"error: --part must be in 1..{len(PARTS)}", file=sys.stderr)
        return 2
    try:
        args.peers = parse_peers(args.peers) if args.peers else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out = os.path.abspath(args.out)
    return run_part(args.part, args)


if __name__ == "__main__":
    sys.exit(main())
