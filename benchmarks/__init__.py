"""Benchmarks: the model zoo (``zoo``), the runner (``bench``), the suite and plots."""
