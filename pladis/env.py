"""On/off switches read from environment variables (``PLADIS_FORCE_TORCH``, ``PLADIS_NUMPY_LOG2``,
``PLADIS_EXP2``, ``PLADIS_TRITON_AUTOTUNE``), parsed one way for all of them.

Why: each used to compare with its own literals, so ``PLADIS_FORCE_TORCH=false`` forced the torch path
and ``PLADIS_NUMPY_LOG2=true`` was silently ignored. A value that is neither on nor off is now ignored
with a warning naming the variable.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger("pladis")

_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"0", "false", "no", "off"})


def env_flag(name: str) -> bool | None:
    """``True``/``False`` when ``name`` is set to an on/off value (1/0, true/false, yes/no, on/off, any
    case), ``None`` when it is unset, empty or unreadable (then a warning, once per value)."""
    raw = os.environ.get(name)
    return None if raw is None else _parse(name, raw)


@functools.lru_cache(maxsize=64)
def _parse(name: str, raw: str) -> bool | None:
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        log.warning("PLADIS: ignoring %s=%r (use 1 or 0)", name, raw)
    return None
