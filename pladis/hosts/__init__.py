"""Host adapters (A1111, Forge, reForge) and host detection.

Nothing here imports WebUI modules at import time; :func:`detect_host` only asks the import system
whether host packages *could* be imported (``importlib.util.find_spec`` on top-level names, which
does not execute them), so calling it has no side effects on the WebUI.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Literal

Host = Literal["a1111", "forge", "reforge"]


def _present(name: str) -> bool:
    """Whether the top-level package ``name`` is importable, without importing it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _has_backend_patcher() -> bool:
    """New Forge ships ``backend/patcher/unet.py``; look for the file instead of importing ``backend``."""
    module = sys.modules.get("backend.patcher.unet")
    if module is not None:
        return True
    try:
        spec = importlib.util.find_spec("backend")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        os.path.isfile(os.path.join(location, "patcher", "unet.py"))
        for location in spec.submodule_search_locations
    )


def detect_host() -> Host:
    """Which WebUI runs us: ``"forge"`` (``backend`` patcher), ``"reforge"`` (``ldm_patched``) or ``"a1111"``.

    Forge and reForge both ship ``modules_forge``; new Forge has the ``backend`` package, reForge and
    pre-August-2024 Forge have ``ldm_patched`` instead. Without ``modules_forge`` it is A1111.
    Evaluated on every call (cheap) so a test or a reload never sees a stale answer.
    """
    if not _present("modules_forge"):
        return "a1111"
    if _has_backend_patcher():
        return "forge"
    if _present("ldm_patched"):
        return "reforge"
    return "forge"


__all__ = ["Host", "detect_host"]
