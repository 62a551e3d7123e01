"""Benchmarks run from a checkout: the suite, engine, start-up and kernel runners, their results
and notes. The model zoo (``compile_backend.zoo``) and the benchmark command
(``compile_backend.bench``) ship with the package; this directory is not installed."""
