"""A fixed-seed slice of the differential fuzzer (benchmarks/fuzz): no wrong result, no crash.

100 random programs through the plain CPU path (ATen, TRITON_INTERPRET=0) and 40 through the
Triton interpreter, alternating validate True/False (about 80 s on 2 cores). Dropout cases are reported but not
asserted (random streams are their own category, see benchmarks/fuzz/runner.py); fallbacks
with a warning are allowed. A failure message names each failing seed with the command that
reruns it and prints its minimised repro:

    python -m benchmarks.fuzz --only-seed SEED --mode MODE --validate true|false
"""
import os

import pytest

from benchmarks.fuzz.graphs import generate
from benchmarks.fuzz.runner import run_case
from benchmarks.fuzz.session import case_seed

SESSION_SEED = 2024
CASES = {"plain": range(0, 100), "interpret": range(100, 140)}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_fuzz_fixed_seeds(mode, monkeypatch):
    # the runner switches TRITON_INTERPRET per case; monkeypatch restores the suite's value
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    problems, dropout = [], []
    for i in CASES[mode]:
        seed = case_seed(SESSION_SEED, i)
        validate = i % 2 == 0
        program = generate(seed)
        res = run_case(program, mode, validate)
        if res.cls not in ("wrong", "crash", "upstream"):
            continue
        line = (f"seed {seed} ({mode}, validate={validate}) {res.cls}: {res.message[:240]}\n"
                f"    rerun: python -m benchmarks.fuzz --only-seed {seed} --mode {mode} "
                f"--validate {str(validate).lower()}")
        (dropout if "dropout" in program.tags else problems).append(line)
    if dropout:
        print("dropout cases failing (not asserted):\n" + "\n".join(dropout))
    assert not problems, f"{len(problems)} fuzz case(s) failed:\n" + "\n".join(problems)
