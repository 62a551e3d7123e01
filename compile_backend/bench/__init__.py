"""The benchmark runner: one model against several peers, trtexec-style.

    python -m compile_backend bench --model resnet50 --precision fp16 --compare eager,inductor,compile_backend
    python -m benchmarks ...                       (the same command, from a checkout)

A peer ``compile_backend[cuda_graphs=off]`` (any ``k=v`` options, comma-separated) is
compile_backend with those options on top of ``--options``, so option sets compare side by side.

Every peer runs the same model object on the same inputs in this process, with
``torch._dynamo.reset()`` between peers. Per peer it records:

* ``compile_s``: wall time of the first call (compile + one run) with empty caches: a fresh
  temporary ``cache_dir`` for compile_backend, fresh Inductor/Triton cache directories for all;
* ``warm_compile_s`` (``--warm-compile``): the same first call in a fresh subprocess whose
  caches are the ones the cold run just filled;
* ``median_ms``, ``p20_ms``, ``p80_ms``: per-call latency after warm-up (CUDA events on a GPU,
  ``time.perf_counter`` on a CPU);
* ``peak_mem_mb``: peak allocated GPU memory over the timed calls (weights, inputs, activations,
  workspaces, CUDA-graph pools: everything the peer holds while it runs);
* ``accuracy`` against an FP32 eager reference computed from an fp32 copy of the model with
  TF32 off: ``max_abs``, ``max_rel`` (max |out - ref| / max |ref|), ``rel_l2``
  (||out - ref|| / ||ref||), ``cosine``, and ``top1`` (argmax agreement over the last dim) when
  the output is logits.

Records are written to ``--out`` after every peer, so a run that is cut off keeps what it
measured. A peer that fails is recorded with an ``error`` field; the run goes on.

Modules, bottom up: ``peers`` (peer and option syntax, UsageError), ``results`` (environment,
results file, table), ``measure`` (compile, time and check one peer), ``cli`` (the command),
``plot`` (a PNG of records; needs matplotlib, the ``dev`` extra). Importing ``compile_backend``
imports none of them.
"""
from .cli import main

__all__ = ["main"]
