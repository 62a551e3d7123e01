"""Declared dynamic dimensions: one engine per size bucket instead of one per size.

Engines are specialised per input shape. A user who knows that a dimension varies (the batch, a
sequence length) declares it with a :class:`Profile`, TensorRT-style::

    torch.compile(model, backend="compile_backend", dynamic=True,
                  options={"profiles": [{"input": 0, "dim": 0, "min": 1, "opt": 8, "max": 64}]})

The choice: **bucketing with padding, validated**. The range is cut into buckets
(:func:`bucket_sizes`: min, opt, max and the powers of two between them). A call whose size
lies in [min, max] runs the engine of the smallest bucket that fits: the inputs are zero-padded
along the declared dimension to the bucket size and the outputs are sliced back. So a range
costs at most ``len(buckets)`` engines (each counted against ``max_engines``), each tuned for its
concrete size, at the price of the padded rows' work. (Kernels compiled for a symbolic size were the alternative; every kernel
family here, GEMM tiling and autotuning in particular, is specialised on concrete shapes, so
buckets reuse all of it.)

Padding is only correct when the real rows of the outputs do not depend on the padded rows. That
fails for a reduction or softmax over the padded dimension, batch norm in training, attention
over a padded sequence without a mask. So the first padded call of each bucket is checked with
the graph's ATen module: it runs on the inputs padded with zeros, padded with random values and
unpadded, and the sliced outputs must agree (pad-content independence, and padded vs unpadded
within the dtype's tolerance). When they do not, the profile is rejected for that graph with
one warning and the graph builds one engine per shape, as without a profile: never a wrong
result. Which output dimensions to slice comes from the graph's symbolic output shapes: a
dimension of size ``c * s`` (``s`` the declared size) is sliced to ``c * size``; any other use
of the declared size in an output shape rejects the profile.

Sizes outside [min, max] get their own engine (counted against ``max_engines``) and one warning.

Dynamo: the backend only sees the range when Dynamo hands it one graph with that dimension
symbolic. Pass ``dynamic=True`` to ``torch.compile`` or call
``torch._dynamo.mark_dynamic(x, dim, min=..., max=...)`` on the example input. Without either,
Dynamo traces the first shape statically (one engine for it, the profile cannot apply to that
graph) and re-traces with the dimension dynamic at the second shape. Dynamo always specialises
sizes 0 and 1, so a call with size 1 runs its own (static) graph and engine.

Profiles apply to inference graphs (no input needs a gradient) of the compiled function itself:
training graphs and graphs that resume after a graph break build one engine per shape.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

# torch is imported where it is used: Options imports this module, and `import compile_backend`
# stays cheap
if TYPE_CHECKING:
    import torch

log = logging.getLogger("compile_backend")

#: key in an ATen GraphModule's ``meta`` where capture records which graph arguments are the
#: compiled function's tensor inputs: a list of (graph arg index, argument name), signature order
USER_INPUTS_META = "compile_backend_user_inputs"

PROFILE_FIELDS = ("input", "dim", "min", "opt", "max")

# padded vs unpadded ATen runs may differ by rounding (another GEMM blocking); pad contents at
# the same shape must not change real rows at all, so that comparison is ten times tighter
_TOLERANCE = {"torch.float64": 1e-7, "torch.float32": 1e-4, "torch.float16": 1e-2, "torch.bfloat16": 3e-2}
_SEED = 20240607


@dataclasses.dataclass(frozen=True)
class Profile:
    """A dimension that varies between calls, and its range.

    input: which tensor input of the compiled function: an int counts its tensor arguments in
        signature order (``model(x, mask)``: x is 0, mask is 1; parameters never count), a str
        names the argument. Tensor arguments the graph does not use are not counted.
    dim: the dimension of that input (negative counts from the end).
    min, opt, max: the sizes the dimension takes, ``1 <= min <= opt <= max``. ``opt`` (the
        common size) always gets its own bucket, so it runs without padding.

    Give ``dynamic=True`` to ``torch.compile`` or ``torch._dynamo.mark_dynamic(x, dim, min=...,
    max=...)`` so Dynamo traces one graph for the range (see the module docstring).
    """

    input: Union[int, str]
    dim: int
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if isinstance(self.input, bool) or not (
            (isinstance(self.input, int) and self.input >= 0) or (isinstance(self.input, str) and self.input)
        ):
            raise ValueError("profile field 'input' must be a tensor input's position (an int >= 0) "
                             f"or an argument name, got {self.input!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise ValueError(f"profile field 'dim' must be an integer, got {self.dim!r}")
        for name in ("min", "opt", "max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"profile field {name!r} must be a positive integer, got {value!r}")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"profile fields must satisfy min <= opt <= max, got min={self.min} "
                             f"opt={self.opt} max={self.max}")

    @property
    def buckets(self) -> Tuple[int, ...]:
        return bucket_sizes(self.min, self.opt, self.max)

    def bucket(self, size: int) -> Optional[int]:
        """The smallest bucket holding ``size``, or None when ``size`` is outside [min, max]."""
        if not self.min <= size <= self.max:
            return None
        return next(b for b in self.buckets if b >= size)

    def describe(self) -> str:
        return f"input {self.input} dim {self.dim}"


def bucket_sizes(min: int, opt: int, max: int) -> Tuple[int, ...]:
    """min, opt, max and every power of two strictly between min and max, sorted."""
    sizes = {min, opt, max}
    power = 1
    while power < max:
        if power > min:
            sizes.add(power)
        power *= 2
    return tuple(sorted(sizes))


def parse_profiles(value: Any) -> Tuple[Profile, ...]:
    """The ``profiles`` option from user values (Profiles or dicts); errors name the entry."""
    if value is None:
        return ()
    if isinstance(value, (Profile, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("option 'profiles' must be a list of profiles such as "
                         "[{'input': 0, 'dim': 0, 'min': 1, 'opt': 8, 'max': 64}], "
                         f"got {type(value).__name__}")
    out: List[Profile] = []
    seen: Dict[Tuple[Any, int], int] = {}
    for i, item in enumerate(value):
        try:
            profile = _profile(item)
        except ValueError as exc:
            raise ValueError(f"option 'profiles' entry {i}: {exc}") from None
        key = (profile.input, profile.dim)
        if key in seen:
            raise ValueError(f"option 'profiles' entries {seen[key]} and {i} both declare "
                             f"input {profile.input!r} dim {profile.dim}")
        seen[key] = i
        out.append(profile)
    return tuple(out)


def _profile(item: Any) -> Profile:
    if isinstance(item, Profile):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"a profile must be a dict with fields {', '.join(PROFILE_FIELDS)}, got {item!r}")
    for name in item:
        if name not in PROFILE_FIELDS:
            close = difflib.get_close_matches(str(name), PROFILE_FIELDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown profile field {name!r}.{hint} Fields: {', '.join(PROFILE_FIELDS)}")
    missing = [name for name in PROFILE_FIELDS if name not in item]
    if missing:
        raise ValueError(f"profile field {missing[0]!r} is missing (fields: {', '.join(PROFILE_FIELDS)})")
    return Profile(**dict(item))


# --------------------------------------------------------------------------- runtime
@dataclasses.dataclass
class Plan:
    """How one call runs in its bucket: per bound profile its size and bucket (None: not used)."""

    sizes: Tuple[Optional[int], ...]
    buckets: Tuple[Optional[int], ...]
    profiles: "GraphProfiles"

    @property
    def padded(self) -> List[int]:
        return [k for k, (s, b) in enumerate(zip(self.sizes, self.buckets)) if b is not None and b != s]

    def only(self, k: int) -> "Plan":
        keep = lambda values: tuple(v if j == k else None for j, v in enumerate(values))  # noqa: E731
        return Plan(keep(self.sizes), keep(self.buckets), self.profiles)

    def pad(self, args: Sequence[Any], fill: str = "zeros") -> List[Any]:
        """``args`` with the declared dimensions grown to the bucket sizes (new tensors)."""
        import torch

        out = list(args)
        generator = torch.Generator().manual_seed(_SEED) if fill == "random" else None
        for i, dims in self.profiles.tensor_dims.items():
            x = args[i]
            shape = list(x.shape)
            for d, k in dims:
                if self.buckets[k] is not None:
                    shape[d] = self.buckets[k]
            if shape != list(x.shape):
                out[i] = _grown(x, shape, generator)
        for i, k in self.profiles.size_args.items():
            if self.buckets[k] is not None:
                out[i] = self.buckets[k]
        return out

    def unpad(self, outputs: Any) -> Any:
        """The graph's outputs with the padded rows sliced off (views, no copies)."""
        result = list(outputs)
        for j, rules in enumerate(self.profiles.output_dims):
            for d, k, factor in rules:
                size, bucket = self.sizes[k], self.buckets[k]
                if bucket is None or bucket == size:
                    continue
                x = result[j]
                if x.shape[d] != factor * bucket:
                    raise RuntimeError(f"output {j} dim {d} has size {x.shape[d]}, expected "
                                       f"{factor} * {bucket} from the padded run")
                result[j] = x.narrow(d, 0, factor * size)
        return type(outputs)(result) if isinstance(outputs, tuple) else result


class GraphProfiles:
    """The user's profiles bound to one ATen graph: which arguments and outputs they touch,
    which buckets were validated and built, and the state the report shows."""

    def __init__(self, name: str, profiles: Sequence[Profile]):
        self.name = name
        self.profiles = list(profiles)
        self.active = [False] * len(profiles)
        self.state: List[Dict[str, Any]] = [
            {"input": p.input, "dim": p.dim, "min": p.min, "opt": p.opt, "max": p.max,
             "buckets": list(p.buckets), "built": [], "status": "active", "reason": None}
            for p in profiles]
        self.arg_of: List[Optional[Tuple[int, int]]] = [None] * len(profiles)  # (graph arg, dim)
        self.tensor_dims: Dict[int, List[Tuple[int, int]]] = {}  # graph arg -> [(dim, profile)]
        self.size_args: Dict[int, int] = {}  # graph arg holding the declared size -> profile
        self.output_dims: List[List[Tuple[int, int, int]]] = []  # per output: (dim, profile, factor)
        self._validated: set = set()
        self._warned_outside = [False] * len(profiles)

    # ----------------------------------------------------------------- binding
    @classmethod
    def bind(cls, aten_gm: torch.fx.GraphModule, profiles: Sequence[Profile], *,
             role: str, name: str) -> "GraphProfiles":
        self = cls(name, profiles)
        if role != "inference":
            return self._not_applied_all("profiles apply to inference graphs; a training graph "
                                         "builds one engine per shape")
        from .fx_passes.rules import written_placeholders

        if written_placeholders(aten_gm.graph):  # a write into a padded copy never reaches the caller
            return self._not_applied_all("the graph writes its inputs (e.g. a KV cache updated in "
                                         "place); it builds one engine per shape")
        user_inputs = aten_gm.meta.get(USER_INPUTS_META)
        if user_inputs is None:
            return self._not_applied_all("which arguments of this graph are the model's inputs is "
                                         "unknown (e.g. a graph that resumes after a graph break)")
        placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
        values = [n.meta.get("val") for n in placeholders]
        symbols: List[Any] = [None] * len(profiles)
        for k, profile in enumerate(profiles):
            symbols[k] = self._resolve(k, profile, user_inputs, values, symbols)
        if any(self.active):
            self._find_uses(values, symbols, aten_gm)
        return self

    def _resolve(self, k: int, profile: Profile, user_inputs, values, symbols) -> Any:
        """The symbol of the declared dimension in this graph (None: the profile does not apply)."""
        import torch

        if isinstance(profile.input, str):
            index = next((i for i, label in user_inputs if label == profile.input), None)
            if index is None:
                return self._not_applied(k, f"this graph has no tensor input named {profile.input!r}")
        elif profile.input < len(user_inputs):
            index = user_inputs[profile.input][0]
        else:
            return self._not_applied(k, f"this graph has {len(user_inputs)} tensor input(s)")
        value = values[index] if index < len(values) else None
        if not isinstance(value, torch.Tensor):
            return self._not_applied(k, "no shape metadata for this input")
        dim = profile.dim + value.dim() if profile.dim < 0 else profile.dim
        if not 0 <= dim < value.dim():
            return self._reject(k, f"the input has {value.dim()} dimension(s), so dim {profile.dim} "
                                   "does not exist")
        size = value.shape[dim]
        expr = size.node.expr if isinstance(size, torch.SymInt) else None
        if expr is None or not getattr(expr, "is_Symbol", False):
            return self._not_applied(
                k, f"the dimension is not dynamic in this graph (size {size}); pass dynamic=True to "
                   "torch.compile or torch._dynamo.mark_dynamic(x, dim, min=..., max=...)")
        if expr in symbols:
            other = self.profiles[symbols.index(expr)].describe()
            return self._not_applied(k, f"same dynamic size as the profile for {other}")
        self.arg_of[k] = (index, dim)
        self.active[k] = True
        return expr

    def _find_uses(self, values: List[Any], symbols: List[Any], aten_gm: torch.fx.GraphModule) -> None:
        """Every argument dimension that carries a declared size is padded with it; every output
        dimension of size c * size is sliced. Any other use of the size rejects that profile."""
        import torch

        index = {s: k for k, s in enumerate(symbols) if s is not None}
        problems: Dict[int, str] = {}

        def uses(expr: Any) -> List[int]:
            return [index[s] for s in getattr(expr, "free_symbols", ()) if s in index]

        for i, value in enumerate(values):
            if isinstance(value, torch.SymInt):
                expr = value.node.expr
                if expr in index:
                    self.size_args[i] = index[expr]
                for k in uses(expr):
                    if expr != symbols[k]:
                        problems.setdefault(k, f"graph argument {i} is {expr}")
            elif isinstance(value, torch.Tensor):
                for d, size in enumerate(value.shape):
                    if not isinstance(size, torch.SymInt):
                        continue
                    expr = size.node.expr
                    if expr in index:
                        self.tensor_dims.setdefault(i, []).append((d, index[expr]))
                    else:
                        for k in uses(expr):
                            problems.setdefault(k, f"graph argument {i} has dim {d} of size {expr}")
        output = next(n for n in aten_gm.graph.nodes if n.op == "output")
        results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
        for j, node in enumerate(results):
            rules: List[Tuple[int, int, int]] = []
            value = node.meta.get("val") if isinstance(node, torch.fx.Node) else node
            if isinstance(node, torch.fx.Node) and value is None:
                for k in index.values():
                    problems.setdefault(k, f"output {j} has no shape metadata")
            elif isinstance(value, torch.SymInt):
                for k in uses(value.node.expr):
                    problems.setdefault(k, f"output {j} is the size itself ({value.node.expr})")
            elif isinstance(value, torch.Tensor):
                for d, size in enumerate(value.shape):
                    if not isinstance(size, torch.SymInt):
                        continue
                    expr = size.node.expr
                    found = uses(expr)
                    if not found:
                        continue
                    coeff, rest = expr.as_coeff_Mul()
                    if len(found) == 1 and rest == symbols[found[0]] and coeff.is_Integer and coeff > 0:
                        rules.append((d, found[0], int(coeff)))
                    else:
                        for k in found:
                            problems.setdefault(k, f"output {j} has dim {d} of size {expr}, not a "
                                                   "multiple of the declared size")
            self.output_dims.append(rules)
        for k, problem in problems.items():
            self._reject(k, f"padding cannot be undone: {problem}")

    # ----------------------------------------------------------------- calls
    def plan(self, args: Sequence[Any]) -> Optional[Plan]:
        """The buckets this call runs in, or None: it runs at its own shape (no active profile,
        or a size outside its declared range)."""
        if not any(self.active):
            return None
        sizes: List[Optional[int]] = []
        buckets: List[Optional[int]] = []
        for k, profile in enumerate(self.profiles):
            if not self.active[k]:
                sizes.append(None)
                buckets.append(None)
                continue
            index, dim = self.arg_of[k]
            size = int(args[index].shape[dim])
            bucket = profile.bucket(size)
            if bucket is None:
                self._warn_outside(k, size)
                return None
            sizes.append(size)
            buckets.append(bucket)
        return Plan(tuple(sizes), tuple(buckets), self)

    def check(self, plan: Plan, args: Sequence[Any], aten_gm: torch.fx.GraphModule) -> bool:
        """True when padding is safe for this plan's buckets (checked once per bucket on its first
        padded call); otherwise the failing profiles are rejected with one warning each."""
        padded = plan.padded
        if not padded or plan.buckets in self._validated:
            return True
        problem = _padding_problem(aten_gm, args, plan, " and ".join(map(self._where, padded)))
        if problem is None:
            self._validated.add(plan.buckets)
            return True
        blamed = {k: problem for k in padded}
        if len(padded) > 1:  # find which declared dimension is at fault
            singles = {k: _padding_problem(aten_gm, args, plan.only(k), self._where(k)) for k in padded}
            blamed = {k: p for k, p in singles.items() if p is not None} or blamed
        for k, cause in blamed.items():
            self._reject(k, cause)
        return False

    def built(self, plan: Plan) -> None:
        for k, bucket in enumerate(plan.buckets):
            if bucket is not None and bucket not in self.state[k]["built"]:
                self.state[k]["built"].append(bucket)
                self.state[k]["built"].sort()

    # ----------------------------------------------------------------- state
    def _where(self, k: int) -> str:
        return f"input {self.profiles[k].input} dim {self.profiles[k].dim}"

    def _not_applied_all(self, reason: str) -> "GraphProfiles":
        for k in range(len(self.profiles)):
            self._not_applied(k, reason)
        return self

    def _not_applied(self, k: int, reason: str) -> None:
        log.debug("compile_backend: %s: profile for %s not applied: %s", self.name, self._where(k), reason)
        self.active[k] = False
        self.state[k].update(status="not applied", reason=reason)
        return None

    def _reject(self, k: int, reason: str) -> None:
        warnings.warn(f"compile_backend: {self.name}: profile for {self._where(k)} rejected: {reason}; "
                      "building one engine per shape instead.", stacklevel=4)
        self.active[k] = False
        self.state[k].update(status="rejected", reason=reason)
        return None

    def _warn_outside(self, k: int, size: int) -> None:
        if self._warned_outside[k]:
            return
        self._warned_outside[k] = True
        p = self.profiles[k]
        warnings.warn(f"compile_backend: {self.name}: {self._where(k)} has size {size}, outside the "
                      f"declared profile [{p.min}, {p.max}]; building an engine for this shape "
                      "(counted against max_engines). Widen the profile to cover it.", stacklevel=4)


# --------------------------------------------------------------------------- validation
def _padding_problem(aten_gm: torch.fx.GraphModule, args: Sequence[Any], plan: Plan,
                     where: str) -> Optional[str]:
    """None when the sliced outputs of padded runs match the unpadded run, else the cause."""
    import torch

    with torch.no_grad():
        try:
            reference = list(aten_gm(*args))
            zero_args = plan.pad(args)
            zero = list(aten_gm(*zero_args))
            noise = list(aten_gm(*plan.pad(args, fill="random")))
        except Exception as exc:
            return f"the graph fails on padded inputs ({type(exc).__name__}: {exc})"
        grown = [a for a, b in zip(zero_args, args) if isinstance(a, torch.Tensor) and a is not b]
        for j, out in enumerate(zero):
            if isinstance(out, torch.Tensor) and any(_same_storage(out, g) for g in grown):
                return f"output {j} is a view of a padded input, so slicing cannot give the caller's view"
        try:
            zero, noise = plan.unpad(zero), plan.unpad(noise)
        except RuntimeError as exc:
            return f"padding cannot be undone: {exc}"
        if len(zero) != len(reference):
            return "the padded run returns a different number of outputs"
        for j, (ref, z, n) in enumerate(zip(reference, zero, noise)):
            if not isinstance(ref, torch.Tensor):
                if not (ref == z and ref == n):
                    return f"output {j} ({ref!r}) changes with padding ({z!r})"
                continue
            if tuple(z.shape) != tuple(ref.shape):
                return f"output {j} has shape {tuple(z.shape)} after slicing, {tuple(ref.shape)} unpadded"
            tolerance = _TOLERANCE.get(str(ref.dtype), 1e-4)
            if ref.dtype == torch.float32 and ref.is_cuda and torch.get_float32_matmul_precision() != "highest":
                tolerance = 1e-2  # the user allowed TF32 for fp32 matmuls: ATen's runs round like it
            error = _error(z, n, tolerance / 10)
            if error is not None:
                return (f"outputs depend on padded rows along {where} (e.g. output {j} changes by "
                        f"{error:.3g} when only the padding values change)")
            error = _error(z, ref, tolerance)
            if error is not None:
                return (f"outputs depend on padded rows along {where} (e.g. output {j} differs by "
                        f"{error:.3g} from the unpadded run)")
    return None


def _error(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> Optional[float]:
    """None when close (relative to the expected tensor's scale), else the largest difference."""
    import torch

    if actual.dtype.is_floating_point or actual.is_complex():
        a, e = actual.detach().double(), expected.detach().double()
        if a.numel() == 0:
            return None
        finite = torch.isfinite(e)
        scale = float(e[finite].abs().max()) if bool(finite.any()) else 0.0
        if torch.allclose(a, e, rtol=rtol, atol=rtol * scale, equal_nan=True):
            return None
        diff = (a - e).abs()
        return float(diff.nan_to_num(nan=float("inf")).max())
    if torch.equal(actual, expected):
        return None
    return float((actual.to(torch.int64) - expected.to(torch.int64)).abs().max())


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        pa, pb = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
    except Exception:
        return False
    return pa != 0 and pa == pb


def _grown(x: torch.Tensor, shape: List[int], generator: Optional[torch.Generator]) -> torch.Tensor:
    """A new tensor of ``shape`` holding ``x`` in its leading corner: zeros elsewhere, or (with a
    generator) random values: normal noise of the input's scale for floats, the input's own
    values for integer and bool tensors (so padded indices stay valid)."""
    import torch

    if generator is None or x.numel() == 0:
        out = x.new_zeros(shape)
    elif x.dtype.is_floating_point:
        scale = float(x.detach().abs().max())
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        out = (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(x.device, x.dtype)
    else:
        flat = x.detach().reshape(-1)
        picks = torch.randint(0, flat.numel(), shape, generator=generator).to(x.device)
        out = flat[picks]
    region = out
    for d, n in enumerate(x.shape):
        region = region.narrow(d, 0, n)
    region.copy_(x)
    return out


__all__ = ["Profile", "bucket_sizes", "parse_profiles", "GraphProfiles", "Plan", "USER_INPUTS_META"]
