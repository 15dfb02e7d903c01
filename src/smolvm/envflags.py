"""Parsing of SmolVM's environment switches (``SMOLVM_*``), in one place."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_FALSE = frozenset({"0", "no", "false", "off"})
_TRUE = frozenset({"1", "yes", "true", "on"})


def env_flag(name: str, default: bool) -> bool:
    """``$name`` as a boolean: 1/yes/true/on or 0/no/false/off (any case); unset, empty or
    anything else gives ``default``."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    if raw:
        log.warning("%s=%r is not a boolean (use 1 or 0); using %s", name, raw, default)
    return default


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    """``$name`` as an integer (``default`` when unset or not a number), at least ``minimum``."""
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, raw, default)
        value = default
    return max(value, minimum) if minimum is not None else value
