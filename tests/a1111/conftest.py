"""Fixtures for the A1111 suite: stand-in host modules installed per test and fully removed after.

The Forge suite defines its own ``modules`` package in the same pytest process, so nothing of the
stand-in may outlive a test: sys.path, sys.modules entries and the PLADIS controller state are
restored in the fixture's teardown.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import pytest

HOST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host")
EXT_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HOST_PACKAGES = ("modules", "ldm", "sgm", "pladis_testkit")

if EXT_ROOT not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, EXT_ROOT)


def _is_host_module(name: str) -> bool:
    return any(name == pkg or name.startswith(pkg + ".") for pkg in HOST_PACKAGES) or name.endswith(".py")


@pytest.fixture
def host():
    """Install the stand-in WebUI; yields a namespace with its modules and the test kit."""
    saved_modules = {name: mod for name, mod in sys.modules.items() if _is_host_module(name)}
    for name in saved_modules:
        del sys.modules[name]
    saved_path = list(sys.path)
    sys.path.insert(0, HOST_DIR)
    from pladis.webui.controller import CONTROLLER

    CONTROLLER.stop()
    CONTROLLER.patcher.new_generation()  # the process-wide patcher's once-per-generation warnings
    try:
        ns = types.SimpleNamespace(
            kit=importlib.import_module("pladis_testkit"),
            shared=importlib.import_module("modules.shared"),
            scripts=importlib.import_module("modules.scripts"),
            script_callbacks=importlib.import_module("modules.script_callbacks"),
            processing=importlib.import_module("modules.processing"),
            sd_models=importlib.import_module("modules.sd_models"),
            errors=importlib.import_module("modules.errors"),
            infotext_utils=importlib.import_module("modules.infotext_utils"),
            hypernetwork=importlib.import_module("modules.hypernetworks.hypernetwork"),
            ldm_attention=importlib.import_module("ldm.modules.attention"),
            sgm_attention=importlib.import_module("sgm.modules.attention"),
            optimizations=importlib.import_module("modules.sd_hijack_optimizations"),
            controller=CONTROLLER,
        )
        ns.optimizations.apply()  # the WebUI's class-level sdp forward, as after model load
        yield ns
    finally:
        CONTROLLER.stop()
        CONTROLLER.patcher.new_generation()
        for name in [n for n in sys.modules if _is_host_module(n)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path


@pytest.fixture
def webui(host):
    """Stand-in host with the extension loaded like A1111 does and a txt2img runner built with gradio."""
    host.loaded = host.kit.load_extension()
    host.runner = host.kit.make_runner(is_img2img=False)
    return host
