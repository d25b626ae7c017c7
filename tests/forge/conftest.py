"""Fixtures for the Forge/reForge adapter tests.

The stand-in host packages (``backend``, ``ldm_patched``, ...) in ``tests/forge/host`` are put on
``sys.path`` per test and every module they create is removed afterwards, restoring whatever was in
``sys.modules`` before: the A1111 suite defines its own ``modules`` package in the same process.
"""

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

HOST_DIR = Path(__file__).parent / "host"
EXT_ROOT = str(Path(__file__).resolve().parents[2])

if EXT_ROOT not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, EXT_ROOT)
HOST_ROOTS = ("backend", "ldm_patched", "modules", "modules_forge", "forge_testkit", "scripts")


def _is_host_module(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in HOST_ROOTS)


@contextlib.contextmanager
def _installed_host() -> Iterator[None]:
    """Put the stand-ins on ``sys.path``; afterwards remove every host module and restore the old ones."""
    saved_modules = {name: module for name, module in sys.modules.items() if _is_host_module(name)}
    for name in saved_modules:
        del sys.modules[name]
    saved_path = list(sys.path)
    sys.path.insert(0, str(HOST_DIR))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for name in [name for name in sys.modules if _is_host_module(name)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        importlib.invalidate_caches()


@pytest.fixture
def forge_host():
    """Install the Forge stand-ins; yield the test kit module; remove everything afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _installed_host():
            yield importlib.import_module("forge_testkit")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def forge_ui_host():
    """The stand-ins without the test kit (whose oracles need the ``entmax`` package): for UI-only tests."""
    with _installed_host():
        yield
