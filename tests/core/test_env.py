"""On/off environment switches: one parser for PLADIS_FORCE_TORCH, _NUMPY_LOG2, _EXP2 and _TRITON_AUTOTUNE."""

from __future__ import annotations

import sys

import pytest

from pladis import env


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        (" Yes ", True),
        ("ON", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
        ("", None),
    ],
)
def test_on_off_values(monkeypatch, raw, expected):
    monkeypatch.setenv("PLADIS_TEST_FLAG", raw)
    assert env.env_flag("PLADIS_TEST_FLAG") is expected


def test_unset_is_none_and_other_values_are_ignored_with_one_warning(monkeypatch, caplog):
    # The warning is once per value and process: forget values parsed before (a rerun, pytest-repeat).
    env._parse.cache_clear()
    monkeypatch.delenv("PLADIS_TEST_FLAG", raising=False)
    assert env.env_flag("PLADIS_TEST_FLAG") is None
    monkeypatch.setenv("PLADIS_TEST_FLAG", "sometimes")
    with caplog.at_level("WARNING", logger="pladis"):
        assert env.env_flag("PLADIS_TEST_FLAG") is None
        assert env.env_flag("PLADIS_TEST_FLAG") is None
    assert [r.getMessage() for r in caplog.records] == [
        "PLADIS: ignoring PLADIS_TEST_FLAG='sometimes' (use 1 or 0)"
    ]


def test_the_switches_use_it(monkeypatch):
    # "false" used to force the torch path, "true" was ignored by the numpy-log2 and autotune switches.
    entmax_module = sys.modules["pladis.entmax"]
    from pladis import triton_kernel

    for raw, expected in (("true", True), ("false", False)):
        monkeypatch.setenv("PLADIS_NUMPY_LOG2", raw)
        assert entmax_module.numpy_log2_is_faster.__wrapped__() is expected
        monkeypatch.setenv("PLADIS_EXP2", raw)
        assert entmax_module.exp2_is_faster.__wrapped__() is expected
        monkeypatch.setenv("PLADIS_TRITON_AUTOTUNE", raw)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        # forced on even where a tile was measured, forced off even where none was
        assert triton_kernel._autotune_enabled(measured_tile=expected) is expected
    monkeypatch.setenv("PLADIS_FORCE_TORCH", "false")
    assert env.env_flag("PLADIS_FORCE_TORCH") is False
