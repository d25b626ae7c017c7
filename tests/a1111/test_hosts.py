"""Host detection by feature, without importing host packages; no WebUI imports at pladis import time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pladis import hosts

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _tree(base, *files):
    for rel in files:
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("raise RuntimeError('must not be imported')\n")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    for name in ("modules_forge", "backend", "backend.patcher.unet", "ldm_patched"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a1111_when_no_forge_packages(isolated):
    assert hosts.detect_host() == "a1111"


def test_forge_by_backend_patcher(isolated):
    _tree(
        isolated,
        "modules_forge/__init__.py",
        "backend/__init__.py",
        "backend/patcher/__init__.py",
        "backend/patcher/unet.py",
    )
    assert hosts.detect_host() == "forge"
    assert "backend" not in sys.modules and "modules_forge" not in sys.modules


def test_reforge_by_ldm_patched(isolated):
    _tree(isolated, "modules_forge/__init__.py", "ldm_patched/__init__.py")
    assert hosts.detect_host() == "reforge"
    assert "ldm_patched" not in sys.modules


def test_pladis_imports_no_webui_modules():
    code = (
        "import sys; import pladis, pladis.hosts, pladis.hosts.a1111, pladis.webui.controller, "
        "pladis.webui.ui, pladis.webui.xyz, pladis.webui.infotext, pladis.webui.args\n"
        "bad = {'modules', 'ldm', 'sgm', 'backend', 'ldm_patched', 'modules_forge', "
        "'gradio', 'diffusers', 'triton'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
