"""Frozen weights and the explicit refit.

In inference the engine freezes the model's parameters and buffers: it folds what depends on
them once and checks, at every call, that each weight is still the same tensor, with the same
storage, at the same version. An in-place update under ``torch.no_grad()``, an optimizer step,
``load_state_dict`` (also with ``assign=True``) and ``p.data = new`` are all seen, and the
folded constants are recomputed before the call (refit).

Writes through ``.data`` (``p.data.copy_(new)``, an EMA's ``p.data.mul_(d).add_(q, alpha=1-d)``,
``bn.running_mean.data.fill_(1)``) are not: ``.data`` hands out a tensor with its own version
counter, so PyTorch records no change that the engine could see without reading the weights'
values. Code that updates weights that way either calls :func:`refit` after the update (cheap:
it marks the weights changed; the next call refits once) or compiles with
``options={"freeze": False}``, which keeps weights as live inputs (read at every call, nothing
folded from them).

So that such code is not served stale results silently, :class:`WeightWatch` compares a sample
of every frozen weight (16 evenly spaced values each) with the values the engine last folded, at
the 2nd, 4th, 8th, ... call and then every 1024th. A difference warns once, naming the fix, and
refits; from then on that engine compares at every call. The sample costs one small gather per
weight and one device sync on the calls it runs.
"""
from __future__ import annotations

from typing import Any, Iterable, List


def refit(weights: Any) -> int:
    """Mark the parameters and buffers of ``weights`` (a module, or tensors) as changed, so every
    engine that froze them refits at its next call. Returns how many tensors were marked."""
    import torch

    tensors: List[torch.Tensor]
    if isinstance(weights, torch.nn.Module):
        tensors = [*weights.parameters(), *weights.buffers()]
    elif isinstance(weights, torch.Tensor):
        tensors = [weights]
    elif isinstance(weights, Iterable):
        tensors = list(weights)
        bad = [type(t).__name__ for t in tensors if not isinstance(t, torch.Tensor)]
        if bad:
            raise TypeError(f"refit takes a module or tensors, got a {bad[0]} among them")
    else:
        raise TypeError(f"refit takes a module or tensors, got {type(weights).__name__}")
    if tensors:
        # the same version bump an in-place op makes; the engine's per-call check sees it
        torch.autograd.graph.increment_version(tensors)
    return len(tensors)


class WeightWatch:
    """Samples of an engine's frozen weights, compared on a sparse schedule (see module doc)."""

    SAMPLES = 16  # values per weight
    MAX_INTERVAL = 1024  # calls between checks once the powers of two run out

    def __init__(self) -> None:
        self.calls = 0
        self.next_check = 2
        self.every_call = False
        self._reference: Any = None

    def remember(self, tensors: Iterable[Any]) -> None:
        """Take the reference sample (after a build or a refit)."""
        self._reference = _sample(tensors)

    def due(self) -> bool:
        self.calls += 1
        if self.every_call:
            return True
        if self.calls < self.next_check:
            return False
        self.next_check = min(self.next_check * 2, self.calls + self.MAX_INTERVAL)
        return True

    def changed(self, tensors: Iterable[Any]) -> bool:
        import torch

        now = _sample(tensors)
        if self._reference is None or now is None:
            return False
        return not torch.equal(now.isnan(), self._reference.isnan()) or \
            not torch.equal(now.nan_to_num(), self._reference.nan_to_num())


def _sample(tensors: Iterable[Any]) -> Any:
    import torch

    parts = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or not (t.is_floating_point() or t.is_complex()
                                                                         or t.dtype.is_signed or t.dtype == torch.bool):
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // WeightWatch.SAMPLES)
        parts.append(flat[::step][:WeightWatch.SAMPLES].to(torch.float64 if not t.is_complex() else torch.complex128))
    if not parts:
        return None
    with torch.no_grad():
        return torch.cat([p.reshape(-1) if not p.is_complex() else torch.view_as_real(p).reshape(-1) for p in parts])


__all__ = ["refit", "WeightWatch"]
