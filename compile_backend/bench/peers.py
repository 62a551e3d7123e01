"""The peers and options a benchmark command names, and the error it reports for a bad one.

``--compare eager,compile_backend[cuda_graphs=off]``: peers are comma-separated, and
``compile_backend[k=v,...]`` adds options to that peer alone; ``--options`` is a JSON object or
``k=v`` pairs. Both are validated here, before a model is built or compiled.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

import torch

PEERS = ("eager", "inductor", "inductor-max-autotune", "inductor-reduce-overhead", "compile_backend")
DEFAULT_PEERS = ("eager", "inductor", "compile_backend")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(ValueError):
    """A mistake in the command line or in the user's model factory: ``main`` prints it as one
    line (the cause and the fix) and exits with status 2, without a traceback."""


def parse_options(text: Optional[str]) -> Dict[str, Any]:
    """``'{"autotune": "max"}'`` or ``autotune=max,validate=false`` -> dict (values JSON-decoded
    when they parse, e.g. numbers and booleans, else kept as strings)."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ValueError("a JSON value of options must be an object")
        return value
    options: Dict[str, Any] = {}
    for pair in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in pair:
            raise ValueError(f"options entry {pair!r} is not key=value")
        key, raw = (s.strip() for s in pair.split("=", 1))
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def parse_peers(text: str) -> List[str]:
    """Comma-separated peers; ``compile_backend[k=v,...]`` is compile_backend with these options
    on top of ``--options`` (so one run can compare option sets, e.g. ``cuda_graphs=off``)."""
    peers, depth, current = [], 0, ""
    for ch in text:  # commas inside [...] or {...} belong to a peer's options
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            peers.append(current.strip())
            current = ""
        else:
            current += ch
    peers = [p for p in peers + [current.strip()] if p]
    unknown = [p for p in peers if split_peer(p)[0] not in PEERS]
    if unknown or not peers:
        raise UsageError(f"--compare: unknown peer(s) {unknown}; choose among {', '.join(PEERS)}"
                         " (compile_backend also as compile_backend[option=value,...])")
    return peers


def split_peer(peer: str) -> Tuple[str, Dict[str, Any]]:
    """``'compile_backend[cuda_graphs=off]'`` -> ``('compile_backend', {'cuda_graphs': 'off'})``;
    the options are validated now, so a typo fails before anything is compiled."""
    if not peer.endswith("]") or "[" not in peer:
        return peer, {}
    name, text = peer[:-1].split("[", 1)
    if name != "compile_backend":
        raise UsageError(f"--compare: only compile_backend takes [options], got {peer!r}")
    try:
        options = parse_options(text)
    except ValueError as exc:
        raise UsageError(f"--compare {peer}: {exc}") from None
    from ..options import Options

    try:
        Options.from_mapping(options)
    except ValueError as exc:
        raise UsageError(f"--compare {peer}: {exc}") from None
    return name, options
