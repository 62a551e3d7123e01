"""Differential fuzzer for compile_backend (issue #14): random programs, compiled vs eager.

    python -m benchmarks.fuzz --n 2000 --mode both --seed 0 --validate both \\
        --out benchmarks/results/fuzz_summary.json

Modules:
  program.py   a program as data (inputs, ops over named values, outputs) and its rendering as a
               self-contained Python script (the repro is the exact code that ran)
  graphs.py    the generator: 3-15 ops, odd shapes, strided/transposed/offset/expanded inputs,
               fp32/fp16/bf16, inference or training; each op is run once eagerly while building
  ops.py       the op table (GEMMs, convs with every padding mode, norms, softmax, pointwise with
               broadcasting and scalars, comparisons/where/masked_fill, reductions, views, in-place
               ops on views, cat/split, pooling, attention, casts, dropout, complex conj)
  compare.py   the judgement: per-dtype tolerances, loosened by eager's own error vs an fp64 run
  runner.py    one case: eager, fp64 reference, compiled (plain ATen path or Triton interpreter,
               validate on/off), classes ok/fallback/wrong/crash/upstream/eager_error
  minimize.py  delta debugging over ops, outputs and input layouts; the repro script
  session.py   many cases, grouping by signature, the summary table

Does not import tests/ (the suite imports this package instead: tests/test_fuzz.py).
"""
