"""Whether a layer's 8-bit GEMM or convolution is faster than its float one on this GPU, measured.

With ``options["quant_layers"] = "faster"`` (the default) an INT8/FP8 engine quantizes a layer
only where that pays: TensorRT's precision flags are a permission, and so is ours. On the
H100/H200 cuBLAS's INT8 GEMM is slower than its fp16 GEMM at BERT's shapes, and FP8 with
per-channel weight scales (rowwise) at some; a layer quantized there made the whole engine slower
than the FP16 one (session 9, run 1: BERT INT8 1.29 ms, FP16 1.04).

:class:`LayerSpeed` times, per distinct layer shape, the layer's ``scaled_mm`` / ``scaled_conv``
alone (the vendor GEMMs and the template configs the layer's build tunes; convolutions
channels-last, as the engine runs them on CUDA) beside the float GEMM / cuDNN convolution the tuner times as its
reference, through the tuner and its timing cache (a warm process measures nothing), and
estimates what writing the layer's input in 8 bits adds to the kernel producing it
(:meth:`LayerSpeed.quantize_ms`). The quantize pass asks it (``QuantRequest.speed``) and keeps a
layer float unless its 8-bit GEMM plus that estimate beats the float GEMM; the report gives the
times for a layer left float.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from ..kernels import quant_ref

Times = Optional[Tuple[float, float]]  # (8-bit ms, float ms), or None: not measured
log = logging.getLogger("compile_backend")

#: SASS instructions an element that writing a layer's input in 8 bits adds to the kernel that
#: produces it (a GEMM's epilogue, a norm's reduction): BERT FFN1's FP8 GEMM + GELU epilogue on
#: sm_90 (``benchmarks/kernel_sass.py``, session 14): FP8 6.8, INT8 15.4 (round, clamps, NaN -> 0).
#: Not counted, the probe's INT8 BERT made FFN1 (GELU + INT8 quantize) 52 us against 33 in FP16
#: to win 2 us on FFN2: the engine came out slower than FP16 (H100, session 13). Since session 16
#: INT8's (and INT4's) tail is one conversion to int32 and an integer clamp
#: (``expr_casts.saturate_to_int8``): FFN1's INT8 epilogue 15.3 instructions an element against
#: FP8's 15.9, so both count as FP8's.
QUANTIZE_INSTRUCTIONS = {"fp8": 7.0, "int8": 7.0, "int4": 7.0}
#: lanes an SM issues a clock (4 schedulers x 32) and the sustained clock the estimate assumes
LANES_PER_SM, CLOCK_HZ = 128, 1.75e9
#: a dynamic per-row scale is a row reduction of its own over the input: it reads the input again
#: and writes the codes (3 bytes an element of fp16 input) at about this rate
DYNAMIC_BYTES_PER_S = 3.0e12
#: the probe's tuning key is the layer's group's plus this: same shapes, another group
PROBE_TAG = "layer speed probe"
#: a layer whose float GEMM / convolution would take less than this at an H200's peak rates
#: (:meth:`LayerSpeed.ideal_ms`) is latency, not work: 8 bits cannot pay there, and its probe's
#: isolated timings mislead. ResNet-50 batch 1 (layers of 0.1-1.0 us ideal; H100, session 21):
#: 9-10 layers won 0.5-2.8 us each in their probes, yet the INT8 engine ran 0.336-0.337 ms in two
#: builds against FP16 builds of 0.328-0.330 (and one of 0.370: batch 1's own spread). The
#: smallest layer of the issue's other models is BERT-base b16's attention output, 2.4 us
LATENCY_FLOOR_MS = 0.0015
#: how many of a probe's fastest 8-bit candidates the layer's engine group tunes again (with the
#: heuristic's first and the vendor's): its epilogue may reorder close configs, not far ones
SEEDS = 3
#: a layer whose ideal times (:meth:`LayerSpeed.ideal_gain`) leave 8 bits less than this to win is
#: not measured: it stays float. Those are the layers whose 16-bit output outweighs their math and
#: inputs: ResNet-50 b32's stem (8%) and its expanding 1x1 convolutions (10-11%, 15 of 53 layers),
#: every one of which lost its probe or the write after it (H100, sessions 22-25), each probe ~12
#: candidates of a first call 4x FP16's. Every GEMM of BERT, GPT-2 and ViT has 50%
MIN_IDEAL_GAIN = 0.15
#: the activations (none, ReLU) after which what writing a float producer's output in 8 bits costs
#: is estimated from the producer's float group, which the engine tunes anyway
#: (:meth:`LayerSpeed.write_estimated`): the fastest of our candidates there (they take the
#: quantize in their epilogue; cuDNN's and cuBLAS's fused kernels do not) against the fastest of
#: all, plus the quantize's instructions and bytes. Timing each producer once more with the quantize
#: was 548 of the 822 candidates ResNet-50 b32's INT8 probes compiled, in a first call 4x FP16's
#: (H100, session 25). After a GELU the write is timed: its epilogue's cost changes with the
#: quantize (the tanh form; BERT's FFN1 took 52 us against 33 for an estimated 2, H100 session 13)
ESTIMATED_WRITE_ACTIVATIONS = (None, "relu")
#: the fastest rates any GPU here has (H200: 4.8 TB/s, 990 TFLOP/s dense fp16), so the ideal
#: time is a lower bound everywhere
IDEAL_BYTES_PER_S, IDEAL_FLOP_PER_S = 4.8e12, 990e12


def _probe_args(producer: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """A :meth:`LayerSpeed.write_ms` producer's shapes as :func:`_work` takes them."""
    if "linear" in producer[0]:
        return producer[1:4]
    _, x_shape, w_shape, (stride, padding, dilation, _) = producer[:4]
    return x_shape, w_shape, stride, padding, dilation


def _work(method: str, args: Tuple[Any, ...]) -> Tuple[int, int, int]:
    """(flops, operand elements, output elements) of a probe's GEMM / convolution."""
    if method == "linear":
        m, n, k = args[:3]
        return 2 * m * n * k, m * k + k * n, m * n
    x_shape, w_shape, stride, padding, dilation = args[:5]
    rows = x_shape[0]
    for i, size in enumerate(x_shape[2:]):
        span = dilation[i] * (w_shape[2 + i] - 1) + 1
        rows *= max(0, (size + 2 * padding[i] - span) // stride[i] + 1)
    w_numel = math.prod(w_shape)
    return 2 * rows * w_numel, math.prod(x_shape) + w_numel, rows * w_shape[0]


class LayerSpeed:
    """``speed(m, n, k, dtype, bias)`` for a linear layer, ``speed.conv(x_shape, w_shape, stride,
    padding, dilation, groups, dtype, bias)`` for a 2-D convolution: :data:`Times`."""

    def __init__(self, ctx, precision: str, per_channel: bool, dynamic: bool):
        self.ctx, self.precision = ctx, precision  # ctx: a KernelContext on the CUDA device
        self.per_channel, self.dynamic = per_channel, dynamic
        self.seen: Dict[Tuple[Any, ...], Times] = {}
        self.built: Dict[Tuple[Any, ...], Any] = {}  # probe key -> its tuning, made by prepare
        self.seeds: Dict[Tuple[Any, ...], Tuple[str, ...]] = {}  # probe key -> its fastest 8-bit candidates
        # candidates handed to the compile pools: the layers' own probes, the producers' and
        # float groups (the report's stages["probes"]: where a first call's compiling went)
        self.counts = {"layer_candidates": 0, "group_candidates": 0, "async_candidates": 0}
        self.pending: set = set()  # group probe keys whose kernels prepare_groups_async sent to compile

    def __call__(self, m: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> Times:
        key = ("linear", m, n, k, dtype, bias)
        return self._once(key, f"GEMM {m}x{n}x{k}", lambda: self._race(key, self._tuning(key)))

    def conv(self, x_shape: Sequence[int], w_shape: Sequence[int], stride, padding, dilation, groups: int,
             dtype: torch.dtype, bias: bool) -> Times:
        key = self._conv_key(x_shape, w_shape, stride, padding, dilation, groups, dtype, bias)
        return self._once(key, f"convolution {tuple(x_shape)} * {tuple(w_shape)}",
                          lambda: self._race(key, self._tuning(key)))

    def seeds_of(self, method: str, args: Tuple[Any, ...]) -> Tuple[str, ...]:
        """The names of the :data:`SEEDS` fastest 8-bit candidates of a probe already timed
        (``method`` and ``args`` as the quantize pass asks it), best first: the layer's engine
        group tunes those (``kernels.template.seeded``). Empty: not timed."""
        key = ("linear",) + tuple(args) if method == "linear" else self._conv_key(*args)
        return self.seeds.get(key, ())

    #: read by the quantize pass: a layer under this ideal time is not measured (stays float)
    latency_floor_ms = LATENCY_FLOOR_MS

    #: read by the quantize pass: a layer 8 bits could speed up by less than this is not measured
    min_ideal_gain = MIN_IDEAL_GAIN

    @staticmethod
    def ideal_ms(method: str, args: Tuple[Any, ...], bits: int = 16) -> float:
        """The layer's GEMM / convolution at peak rates (:data:`IDEAL_BYTES_PER_S`,
        :data:`IDEAL_FLOP_PER_S`), its operands read once in ``bits`` bits and its output written
        once in 16 (``bits=8``: the 8-bit kernel, at twice the float math rate): ``method`` and
        ``args`` as the probes take them ("linear": (m, n, k, ...), "conv": (x_shape, w_shape,
        stride, padding, dilation, groups, ...))."""
        flops, operands, outputs = _work(method, args)
        operand_bytes, math_rate = (1, 2 * IDEAL_FLOP_PER_S) if bits == 8 else (2, IDEAL_FLOP_PER_S)
        return max(flops / math_rate, (operand_bytes * operands + 2 * outputs) / IDEAL_BYTES_PER_S) * 1e3

    @classmethod
    def ideal_gain(cls, method: str, args: Tuple[Any, ...]) -> float:
        """The fraction of the layer's float time 8 bits could save at peak rates (0.5 at most:
        twice the math rate, half the operand bytes; less where the 16-bit output's bytes bound
        it): ``1 - ideal_ms(bits=8) / ideal_ms()``."""
        return 1.0 - cls.ideal_ms(method, args, bits=8) / cls.ideal_ms(method, args)

    def prepare(self, probes: Sequence[Tuple[str, Tuple[Any, ...]]]) -> None:
        """Compile the candidates of every probe the quantize pass will ask for, all at once
        (``Tuner.precompile``), before any is timed: ResNet-50's 16 convolution probes of 7-13
        candidates each, compiled one probe after another, made its FP8 engine's first call 1.8x
        its FP16 one's (H100, session 19). ``probes``: ("linear", (m, n, k, dtype, bias)) or
        ("conv", (x_shape, w_shape, stride, padding, dilation, groups, dtype, bias)), the
        arguments of ``__call__`` / ``conv``. A probe that cannot be built is left to its call.
        Where the tuner has compile workers, the compiles stream: each probe's timing waits for
        its own candidates only, in the order given."""
        from ..kernels.autotune import tuner_for

        keys = [("linear",) + tuple(args) if kind == "linear" else self._conv_key(*args) for kind, args in probes]
        tunings = []
        for key in dict.fromkeys(keys):
            if key in self.seen or key in self.built:
                continue
            try:
                self.built[key] = self._tuning(key)
            except Exception as exc:  # noqa: BLE001  (its own call says why, or times it)
                log.debug("compile_backend: probe %s not prepared: %s", key, exc)
                continue
            tunings.append((self._tagged(self.built[key], PROBE_TAG), self.built[key].candidates))
        self.counts["layer_candidates"] += sum(len(c) for _, c in tunings)
        tuner = tuner_for(self.ctx)
        # streamed: each probe is timed once its own candidates have compiled, while the workers
        # compile the next ones (Tuner.precompile_async(each=True)); else all compile first
        if not tuner.precompile_async(tunings, each=True):
            tuner.precompile(tunings)

    def prepare_groups(self, writes: Sequence[Tuple[Tuple[Any, ...], Optional[str], bool]],
                       floats: Sequence[Tuple[Tuple[Any, ...], Optional[str]]] = ()) -> None:
        """As :meth:`prepare`, for the probes asked next of the layers whose 8-bit kernel wins:
        ``writes`` = the arguments of :meth:`write_ms` calls to come (both groups of each, with
        and without the quantize), ``floats`` those of :meth:`float_ms`; all compile in one pool."""
        from ..kernels.autotune import tuner_for

        tunings = self._group_tunings(writes, floats)
        self.counts["group_candidates"] += sum(len(c) for _, c in tunings)
        tuner = tuner_for(self.ctx)
        if not tuner.precompile_async(tunings, each=True):  # streamed, as the layer probes (prepare)
            tuner.precompile(tunings)

    def prepare_groups_async(self, writes: Sequence[Tuple[Tuple[Any, ...], Optional[str], bool]]) -> None:
        """Start compiling the kernels of write probes that may be asked (``writes`` as for
        :meth:`prepare_groups`) in the compile workers, and return at once: the quantize pass
        then times the layer probes while they compile (``Tuner.precompile_async``). Which
        layers win is not known yet, so these are every probed layer's producers' float forms;
        the float group of a producer whose reader stays float is the engine's own group."""
        from ..kernels.autotune import tuner_for

        tunings = self._group_tunings(writes, (), pending=True)
        self.counts["async_candidates"] += tuner_for(self.ctx).precompile_async(tunings)

    def _group_tunings(self, writes, floats, pending: bool = False) -> list:
        """(key, candidates) of the group probes ``writes`` and ``floats`` not yet timed, each
        tuning made once (kept in ``self.built``; ``pending``: their keys in ``self.pending``);
        those prepared so are handed on again, so their runners are built in one pool (their
        kernels loaded from the binary cache)."""
        tunings = []
        for key, build in [(self._write_key(*w), lambda w=w: self._write_tunings(*w)) for w in writes] + \
                          [(self._float_key(*f), lambda f=f: [self._float_tuning(*f)]) for f in floats]:
            if key in self.seen or (key in self.built and key not in self.pending):
                continue
            if key in self.pending and key in self.built:
                if pending:
                    continue
                self.pending.discard(key)
            else:  # (a pending tuning already taken by its probe is made again)
                self.pending.discard(key)
                try:
                    self.built[key] = build()
                except Exception as exc:  # noqa: BLE001  (its own call says why, or times it)
                    log.debug("compile_backend: group probe %s not prepared: %s", key, exc)
                    continue
                if pending:
                    self.pending.add(key)
            tunings += [(t.key, t.candidates) for t in self.built[key]]
        return tunings

    def float_ms(self, producer: Tuple[Any, ...], activation: Optional[str]) -> Optional[float]:
        """The best time of a convolution's own float group, as a float engine builds it (the
        bias, residual add and ReLU in its epilogue; every candidate the engine tunes): the
        float side a layer's 8-bit kernel must beat. ``producer`` and ``activation`` as
        :meth:`write_ms` takes them. Its key is the engine's, so a layer left float finds its
        group tuned. None: not measured."""
        key = self._float_key(producer, activation)
        times = self._once(key, f"float group {producer[0]} {producer[1:3]}", lambda: self._float(key, producer, activation))
        return None if times is None else times[1]

    def _float(self, key, producer, activation) -> Times:
        tuning = (self.built.pop(key, None) or [self._float_tuning(producer, activation)])[0]
        timed = self._timings(tuning)
        return None if not timed else (min(timed.values()),) * 2

    def _float_tuning(self, producer, activation):
        from ..kernels.conv import conv_candidates

        return conv_candidates(write_groups(producer, activation, False, self.precision, self.ctx.device)[1], self.ctx)

    @staticmethod
    def _float_key(producer, activation) -> Tuple[Any, ...]:
        return ("float", repr(producer), activation)

    @staticmethod
    def _write_key(producer, activation, tanh_unit) -> Tuple[Any, ...]:
        return ("write", repr(producer), activation, tanh_unit)

    @staticmethod
    def _conv_key(x_shape, w_shape, stride, padding, dilation, groups, dtype, bias) -> Tuple[Any, ...]:
        geometry = (tuple(stride), tuple(padding), tuple(dilation), groups)
        return ("conv", tuple(x_shape), tuple(w_shape), geometry, dtype, bias)

    def quantize_ms(self, numel: int) -> float:
        """Estimated time the layer's input quantize adds where that input is made, for
        ``numel`` elements: the instructions an element (:data:`QUANTIZE_INSTRUCTIONS`) at the
        GPU's issue rate; a dynamic scale's row reduction at :data:`DYNAMIC_BYTES_PER_S`. An
        estimate, not a measurement: the producer is some other group of the graph. 0 off CUDA."""
        if self.ctx is None or self.ctx.device.type != "cuda":
            return 0.0
        sms = torch.cuda.get_device_properties(self.ctx.device).multi_processor_count
        seconds = numel * QUANTIZE_INSTRUCTIONS.get(self.precision, 16.0) / (sms * LANES_PER_SM * CLOCK_HZ)
        if self.dynamic:
            seconds += numel * 3 / DYNAMIC_BYTES_PER_S
        return seconds * 1e3

    def standalone_quantize_ms(self, numel: int, itemsize: int) -> float:
        """Estimated time of a static quantize that runs as a kernel of its own (its input is a
        graph input or a max pool's output: no kernel of ours writes it quantized): the input
        read and the codes written at :data:`DYNAMIC_BYTES_PER_S`, plus a kernel's latency
        (:data:`LATENCY_FLOOR_MS`). The instruction count of :meth:`quantize_ms` charged 1.5 us
        for ResNet-50 b32's pool output (6.4M fp16 values, 19 MB moved: ~6 us), which the FP8
        engine then quantized in a kernel of its own for layer1's downsample (H100, session 22).
        0 off CUDA."""
        if self.ctx is None or self.ctx.device.type != "cuda":
            return 0.0
        moved_ms = numel * (itemsize + 1) / DYNAMIC_BYTES_PER_S * 1e3
        return max(self.quantize_ms(numel), moved_ms) + LATENCY_FLOOR_MS

    def write_ms(self, producer: Tuple[Any, ...], activation: Optional[str], tanh_unit: bool = True) -> Optional[float]:
        """What writing its output in 8 bits costs a float GEMM / convolution producer, measured
        after a GELU, else estimated from its float group (:data:`ESTIMATED_WRITE_ACTIVATIONS`,
        :meth:`_estimated_write`). Measured:
        its best kernel with the quantize in its epilogue against its best kernel without (every
        candidate of the tuner: cuBLAS/cuDNN with their own fused epilogues, our templates, the
        vendor's plus a kernel of ours), on the producer's shapes with its bias and ``activation``
        ("relu", "gelu" or None; ``tanh_unit``: a GELU before the quantize takes its tanh form,
        ``Options.quant_gelu``). ``producer``: ("linear", m, n, k, dtype, bias, b_transposed,
        frame) or ("conv", x_shape, w_shape, geometry, dtype, bias[, residual operand]), or their 8-bit
        forms "qlinear" / "qconv" (:func:`write_groups`). The
        groups timed are the engine's own, so their timings serve its build. None: not measured."""
        key = self._write_key(producer, activation, tanh_unit)
        what = f"{producer[0]} producer {producer[1:3]}"
        times = self._once(key, what, lambda: self._write(key, producer, activation, tanh_unit))
        return None if times is None else max(0.0, times[0] - times[1])

    @staticmethod
    def write_estimated(activation: Optional[str]) -> bool:
        """Whether :meth:`write_ms` estimates the write after ``activation`` rather than timing a
        group with the quantize (:data:`ESTIMATED_WRITE_ACTIVATIONS`)."""
        return activation in ESTIMATED_WRITE_ACTIVATIONS

    def codes_ms(self, numel: int, beside_float: bool, float_itemsize: int = 2) -> float:
        """Estimated time the quantize adds to an epilogue of ours writing ``numel`` values: its
        instructions (:meth:`quantize_ms`) and, where the float value is written too
        (``beside_float``), the codes' bytes. Where the codes replace the float value (of
        ``float_itemsize`` bytes), the instructions less the time the fewer bytes save, never
        below 0. Serves the estimated producer writes (:meth:`_estimated_write`) and the quantize
        pass's charge where a norm or element-wise kernel writes the input: GPT-2 b8's FFN2
        (4096x768x3072, after its tanh-GELU chain, the latter case) lost its INT8 GEMM by 30.6 us
        (27.6 + 3.0 of instructions) to 29.7 with the saving uncounted; counted, 48 of 49 layers
        quantize and the engine runs 0.81x FP16 against 0.87x (H100, session 27). 0 off CUDA."""
        if self.ctx is None or self.ctx.device.type != "cuda":
            return 0.0
        if beside_float:
            return self.quantize_ms(numel) + numel / DYNAMIC_BYTES_PER_S * 1e3
        saved = numel * max(0, float_itemsize - 1) / DYNAMIC_BYTES_PER_S * 1e3
        return max(0.0, self.quantize_ms(numel) - saved)

    def _estimated_write(self, producer, tunings) -> Times:
        """(our template with the quantize, the float group's best) for :meth:`write_ms`: the
        float group's fastest candidate of ours (one that can take the quantize in its epilogue)
        plus :meth:`codes_ms`, against its fastest of all (cuDNN's / cuBLAS's fused kernels
        included); an 8-bit producer's kernel is ours already (no tuning: ``tunings`` empty)."""
        _, _, outputs = _work("linear" if "linear" in producer[0] else "conv", _probe_args(producer))
        codes = self.codes_ms(outputs, producer[0].endswith("+float"), producer[4].itemsize)
        if not tunings:
            return codes, 0.0
        (tuning,) = tunings
        timed = self._timings(tuning)
        ours = [timed[c.name] for c in tuning.candidates if c.impl == "triton" and c.name in timed]
        if not timed:
            return None
        best = min(timed.values())
        if not ours:  # no kernel of ours can write the codes there: a quantize kernel of its own
            return best + self.standalone_quantize_ms(outputs, producer[4].itemsize), best
        return min(ours) + codes, best

    def _write(self, key, producer, activation, tanh_unit) -> Times:
        best = []
        tunings = self.built.pop(key, None)
        if tunings is None:
            tunings = self._write_tunings(producer, activation, tanh_unit)
        if self.write_estimated(activation):
            return self._estimated_write(producer, tunings)
        for tuning in tunings:
            # no tag: the probe's group is the engine's own (see write_groups), so the engine
            # finds these timings under its key and tunes the producer once, not twice
            timed = self._timings(tuning)
            best.append(min(timed.values()) if timed else None)
        return None if None in best else (best[0], best[1])

    def _write_tunings(self, producer, activation, tanh_unit) -> list:
        """The tunings of the producer's group with its output quantized and without; where the
        write is estimated (:meth:`write_estimated`), the float producer's group without the
        quantize alone (the engine's own), and nothing for an 8-bit producer."""
        from ..kernels.conv import conv_candidates
        from ..kernels.gemm import gemm_candidates
        from ..kernels.qconv import scaled_conv_candidates
        from ..kernels.qgemm import scaled_mm_candidates
        from ..kernels.template import PROBE_SEEDS

        kind = producer[0].split("+")[0]
        estimated = self.write_estimated(activation)
        if estimated and kind in ("qlinear", "qconv"):
            return []
        build = {"linear": gemm_candidates, "conv": conv_candidates, "qlinear": scaled_mm_candidates,
                 "qconv": lambda group, ctx: scaled_conv_candidates(group, ctx, vendor=False)}[kind]
        groups = write_groups(producer, activation, tanh_unit, self.precision, self.ctx.device, self.per_channel)
        if estimated:
            return [build(groups[1], self.ctx)]
        seeds = self._producer_seeds(producer) if kind in ("qlinear", "qconv") else ()
        for group in groups if seeds else ():
            # an 8-bit producer's groups tune its own probe's fastest configs, as its engine
            # group does (``template.seeded``; the same key, so the engine reuses the timings):
            # with every config, ResNet-50 b32's first INT8 call compiled for 45 s against 17
            # before these probes were prepared in the pool (H100, session 24)
            next(n for n in group.gm.graph.nodes if n.name == group.anchor).meta[PROBE_SEEDS] = seeds
        return [build(group, self.ctx) for group in groups]

    def _producer_seeds(self, producer: Tuple[Any, ...]) -> Tuple[str, ...]:
        """The seeds (:meth:`seeds_of`) of an 8-bit producer's own probe: its GEMM / convolution
        alone at its shapes; () where that probe was not timed."""
        if producer[0].startswith("qlinear"):
            _, m, n, k, dtype, bias = producer[:6]
            return self.seeds_of("linear", (m, n, k, dtype, bias))
        _, x_shape, w_shape, (stride, padding, dilation, groups), dtype, bias = producer[:6]
        return self.seeds_of("conv", (x_shape, w_shape, stride, padding, dilation, groups, dtype, bias))

    def _timings(self, tuning, tag: Optional[str] = None) -> Dict[str, float]:
        """{candidate: ms} from the tuner, under the tuning's key, marked ``tag`` where the probe's
        group is not the engine's though its shapes are (the layer's 8-bit GEMM alone)."""
        from ..kernels.autotune import tuner_for

        return tuner_for(self.ctx).choose(self._tagged(tuning, tag), tuning.candidates, tuning.make_inputs).timings_ms or {}

    @staticmethod
    def _tagged(tuning, tag: Optional[str]):
        return tuning.key if tag is None else dataclasses.replace(tuning.key, extra=tuning.key.extra + " | " + tag)

    def _once(self, key, what: str, measure: Callable[[], Times]) -> Times:
        if key not in self.seen:
            try:
                self.seen[key] = measure()
            except Exception as exc:  # noqa: BLE001  (a failed measurement never fails the compile)
                log.warning("compile_backend: could not time the %s %s against float (%s: %s); the layer is "
                            "quantized", self.precision, what, type(exc).__name__, exc)
                self.seen[key] = None
        return self.seen[key]

    def _operands(self, x_shape, w_shape, per_row: bool, dtype: torch.dtype, bias: bool):
        """(xq, x_scale, wq, w_scale, bias) of random values at these shapes, quantized as the pass does."""
        dev, storage = self.ctx.device, quant_ref.STORAGE[self.precision]
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(x_shape, device=dev, generator=gen)
        fan_in = 1
        for d in w_shape[1:]:
            fan_in *= d
        w = torch.randn(w_shape, device=dev, generator=gen) / fan_in ** 0.5
        xs = quant_ref.row_scale(x, self.precision) if per_row else quant_ref.scale_from_amax(x.abs().amax(), self.precision)
        wq, ws = quant_ref.quantize_weight(w, self.precision, self.per_channel)
        b = torch.randn(w_shape[0], device=dev, generator=gen).to(dtype) if bias else None
        return quant_ref.quantize(x, xs, self.precision).to(storage), xs, wq, ws, b

    def _tuning(self, key: Tuple[Any, ...]):
        """The probe's tuning (``prepare`` built it, or built now): the layer's ``scaled_mm`` /
        ``scaled_conv`` alone at its shapes on random operands, with the vendor GEMMs and the
        template configs the layer's own build tunes at this tuning level (``fast``: at most 8):
        with the heuristic config alone the INT8 GEMM at BERT's QKV timed 23.2 us against fp16's
        17.0 (H100, session 16) where tuned it takes 15.7 against 16.9 (H200, session 15), so INT8
        engines quantized nothing."""
        from ..kernels.qconv import scaled_conv_candidates
        from ..kernels.qgemm import scaled_mm_candidates
        from ..kernels.template import traced_group

        if key in self.built:
            return self.built.pop(key)
        if key[0] == "linear":
            _, m, n, k, dtype, bias = key
            inputs = self._operands((m, k), (n, k), self.dynamic, dtype, bias)
            group = traced_group(lambda xq, xs, wq, ws, b: torch.ops.compile_backend.scaled_mm(xq, xs, wq, ws, b, dtype),
                                 inputs, "gemm", "scaled_mm")
            return scaled_mm_candidates(group, self.ctx)
        _, x_shape, w_shape, (stride, padding, dilation, groups), dtype, bias = key
        geometry = (list(stride), list(padding), list(dilation), groups)
        xq, xs, wq, ws, b = self._operands(x_shape, w_shape, False, dtype, bias)
        cl = torch.channels_last  # as the engine runs convolutions on CUDA
        inputs = (xq.contiguous(memory_format=cl), xs, wq.contiguous(memory_format=cl), ws, b)
        group = traced_group(lambda xq, xs, wq, ws, b: torch.ops.compile_backend.scaled_conv(xq, xs, wq, ws, b, *geometry, dtype),
                             inputs, "conv", "scaled_conv")
        return scaled_conv_candidates(group, self.ctx, vendor=False)

    def _race(self, key, tuning) -> Times:
        """Best 8-bit candidate and the float reference, timed by the tuner under a key of its
        own (the layer's real group, same shapes, is tuned under the plain key: over the
        :data:`SEEDS` fastest here, which :meth:`seeds_of` gives)."""
        timed = self._timings(tuning, PROBE_TAG)
        floats = [timed[c.name] for c in tuning.candidates if c.reference and c.name in timed]
        quants = sorted((timed[c.name], c.name) for c in tuning.candidates if not c.reference and c.name in timed)
        self.seeds[key] = tuple(name for _, name in quants[:SEEDS])
        return (quants[0][0], floats[0]) if floats and quants else None


def write_groups(producer: Tuple[Any, ...], activation: Optional[str], tanh_unit: bool, precision: str,
                 device: torch.device, per_channel: bool = True):
    """The producer's group with its output quantized to ``precision`` and without, as kernel
    groups in the form the engine's partition gives them: inputs in first-use order (a GEMM's bias,
    x, its b as the GEMM reads it, then the quantize's inverse scale), the view to the frame the
    activation runs in, canonical node names. So the engine's own group has the same tuning key,
    and reuses the probe's timings (INT8 BERT's FFN1 was tuned three times: session 19's notes).
    ``producer``: ("linear", m, n, k, dtype, bias, b_transposed, frame) or ("conv", x_shape,
    w_shape, geometry, dtype, bias[, p: a residual of the output's shape added before the
    activation as the add's operand p (0 or 1), the engine's conv + add + ReLU group]), or
    ("qconv", ...) / ("qlinear", ...) as "conv" / "linear" for a convolution / GEMM already
    quantized to ``precision`` (its 8-bit operands, weight scales per channel or not as
    ``per_channel``; a qlinear's weight is [N, K]) (``LayerSpeed.write_ms``). A
    kind marked ``+float`` ("conv+float") writes the float value beside the codes: another reader
    needs it (``quant_probes.group_problem``)."""
    from ..fx_passes import PassContext
    from ..fx_passes.quant_math import approximate_before_quantize
    from ..kernels.base import canonical_names
    from ..kernels.template import traced_group

    base, _, kept = producer[0].partition("+")
    producer = (base,) + tuple(producer[1:])
    gen = torch.Generator(device=device).manual_seed(0)
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu}.get(activation, lambda y: y)
    inv = torch.tensor(16.0, device=device)
    if producer[0] == "linear":
        _, m, n, k, dtype, bias, b_transposed, frame = producer
        b = torch.randn(n, k, device=device, generator=gen).to(dtype).t() if b_transposed else \
            torch.randn(k, n, device=device, generator=gen).to(dtype)
        inputs = ((torch.randn(n, device=device, generator=gen).to(dtype),) if bias else ()) + \
            (torch.randn(m, k, device=device, generator=gen).to(dtype), b)

        # a frame of another size (an op between that broadcasts): the GEMM's own [m, n] shape
        framed = tuple(frame) != (m, n) and math.prod(frame) == m * n

        def layer(*xb):
            y = torch.addmm(*xb) if bias else torch.mm(*xb)
            return y.view(frame) if framed else y
        kind, anchor = "gemm", "mm"
    elif producer[0] == "qlinear":
        _, m, n, k, dtype, bias, _, frame = producer
        x, w = torch.randn(m, k, device=device, generator=gen), torch.randn(n, k, device=device, generator=gen)
        xs = quant_ref.scale_from_amax(x.abs().amax(), precision)
        wq, ws = quant_ref.quantize_weight(w, precision, per_channel)
        inputs = (quant_ref.quantize(x, xs, precision), xs, wq, ws) + \
            ((torch.randn(n, device=device, generator=gen).to(dtype),) if bias else ())
        framed = tuple(frame) != (m, n) and math.prod(frame) == m * n

        def layer(xq, xs, wq, ws, *b):
            y = torch.ops.compile_backend.scaled_mm(xq, xs, wq, ws, b[0] if b else None, dtype)
            return y.view(frame) if framed else y
        kind, anchor = "gemm", "scaled_mm"
    else:
        _, x_shape, w_shape, geometry, dtype, bias, *residual = producer
        cl = torch.channels_last
        x, w = torch.randn(x_shape, device=device, generator=gen), torch.randn(w_shape, device=device, generator=gen)
        if producer[0] == "qconv":
            xs = quant_ref.scale_from_amax(x.abs().amax(), precision)
            wq, ws = quant_ref.quantize_weight(w, precision, per_channel)
            inputs = (quant_ref.quantize(x, xs, precision).contiguous(memory_format=cl), xs,
                      wq.contiguous(memory_format=cl), ws)
        else:
            inputs = (x.to(dtype).contiguous(memory_format=cl), w.to(dtype).contiguous(memory_format=cl))
        inputs += (torch.randn(w_shape[0], device=device, generator=gen).to(dtype),) if bias else ()
        stride, padding, dilation, groups = geometry
        if residual:  # of the convolution's output shape (computed on meta tensors)
            out = torch.nn.functional.conv2d(torch.empty(x_shape, device="meta"), torch.empty(w_shape, device="meta"),
                                             None, stride, padding, dilation, groups).shape
            inputs += (torch.randn(out, device=device, generator=gen).to(dtype).contiguous(memory_format=cl),)

        scaled = producer[0] == "qconv"

        def layer(*args):
            (x, w), rest = (args[0], args[2]) if scaled else args[:2], args[4 if scaled else 2:]
            b = rest[0] if bias else None
            if scaled:
                y = torch.ops.compile_backend.scaled_conv(x, args[1], w, args[3], b, stride, padding, dilation, groups,
                                                          dtype)
            else:
                y = torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)
            if not residual:
                return y
            return rest[-1] + y if residual[0] == 0 else y + rest[-1]  # the model's operand order
        kind, anchor = "conv", "scaled_conv" if scaled else "convolution"

    def quantized(*args):
        value = act(layer(*args[:-1]))
        codes = quant_ref.quantize_steps(quant_ref.eager, value, dtype, args[-1], precision)
        return (value, codes) if kept == "float" else codes
    out = []
    for fn, args in ((quantized, inputs + (inv,)), (lambda *args: act(layer(*args)), inputs)):
        group = traced_group(fn, args, kind, anchor)
        if tanh_unit and fn is quantized:  # as the engine computes a GELU only a quantize reads
            approximate_before_quantize(group.gm, PassContext())
        canonical_names(group.gm.graph)
        group.gm.recompile()
        group.anchor = next(n.name for n in group.gm.graph.nodes if n.op == "call_function" and anchor in str(n.target))
        out.append(group)
    return out


__all__ = ["LayerSpeed", "Times", "LATENCY_FLOOR_MS", "SEEDS", "QUANTIZE_INSTRUCTIONS", "write_groups"]
