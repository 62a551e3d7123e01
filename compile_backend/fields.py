"""Validation shared by the frozen option dataclasses (``Options``, ``quant.QuantConfig``)."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Iterable


def check_names(cls: type, names: Iterable[Any], what: str = "option") -> None:
    """Raise ValueError for a name that is not a field of dataclass ``cls``, with a did-you-mean."""
    valid = [f.name for f in dataclasses.fields(cls)]
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {what} {name!r}.{hint} Valid options: {', '.join(valid)}")


__all__ = ["check_names"]
