"""Infotext paste where the host's UI paste calls the targets outside any ``try`` (Forge Classic/Neo,
SD.Next, older A1111), and where it does not."""

from types import SimpleNamespace

import pytest

GOOD = {"PLADIS alpha": "1.75", "PLADIS lambda": "3", "PLADIS layers": "down+up", "PLADIS range": "0.2-0.8"}
CONTROLS = [SimpleNamespace(value=v) for v in (False, 1.5, 2.0, ["down", "up"], 0.0, 1.0)]
_BAD = [
    ("PLADIS alpha", "5", [1], ["PLADIS alpha", "[1, 2]"]),
    ("PLADIS lambda", "12", [2], ["PLADIS lambda", "[0, 10]"]),
    ("PLADIS layers", "sideways", [3], ["PLADIS layers", "down, mid, up", "'sideways'"]),
    ("PLADIS range", "soon", [4, 5], ["PLADIS range", "start-end", "'soon'"]),
]


def _paste_all(fields):
    # Through paste_func, as Neo's button calls it: a paste_func of modules.infotext_utils is also
    # A1111's guarded paste, so only the target's direct caller (_parse_info) tells them apart.
    from modules.infotext_utils import SKIP, paste_func

    from pladis.webui.infotext import PASTE_TARGETS

    pasted = paste_func(list(zip(CONTROLS, PASTE_TARGETS, strict=True)), fields)
    return [None if value == SKIP else value["value"] for value in pasted]


@pytest.mark.parametrize(("key", "bad", "skipped", "fragments"), _BAD)
def test_a_bad_value_is_logged_and_the_rest_of_the_paste_goes_on(
    forge_host, caplog, key, bad, skipped, fragments
):
    # Raised there, one malformed PLADIS value aborted the whole paste (prompt and seed included).
    assert _paste_all(GOOD) == [True, 1.75, 3.0, ["down", "up"], 0.2, 0.8]
    with caplog.at_level("ERROR", logger="pladis"):
        pasted = _paste_all({**GOOD, key: bad})
    expected = [True, 1.75, 3.0, ["down", "up"], 0.2, 0.8]
    for index in skipped:
        expected[index] = None
    assert pasted == expected
    messages = [record.getMessage() for record in caplog.records]
    assert messages and all(all(fragment in message for fragment in fragments) for message in messages), (
        messages
    )


_GUARDED = """
def paste_func(target, fields):
    try:
        return target(fields)
    except Exception:
        errors.report("Error executing target")  # A1111 1.10 goes on; re-raised here to observe it
        raise
"""
_API = """
def apply_infotext(target, fields):
    def get_field_value(target, fields):
        return target(fields)

    return get_field_value(target, fields)
"""


def _call_as(module: str, function: str, target, fields, source: str | None = None):
    """``target(fields)`` called from a function named ``function`` in a module named ``module``
    (its source ``source``, else a plain call)."""
    namespace = {"__name__": module, "errors": SimpleNamespace(report=lambda *args, **kwargs: None)}
    exec(source or f"def {function}(target, fields):\n    return target(fields)\n", namespace)
    return namespace[function](target, fields)


BAD = {**GOOD, "PLADIS alpha": "5"}


@pytest.mark.parametrize(
    ("module", "function", "source"),
    [
        ("modules.api.api", "apply_infotext", None),
        ("modules.api.api", "apply_infotext", _API),  # get_field_value inside it, as upstream
        ("modules.infotext_utils", "paste_func", _GUARDED),
    ],
)
def test_callers_that_report_the_error_get_it_raised(module, function, source):
    # The API's infotext field (the request fails naming the value) and the UI paste of A1111 1.10,
    # Forge and reForge (it reports the error and leaves the control): tests/a1111/test_infotext.py.
    from pladis.webui.infotext import paste_alpha

    with pytest.raises(ValueError, match=r"PLADIS alpha.*\[1, 2\]"):
        _call_as(module, function, paste_alpha, BAD, source)


@pytest.mark.parametrize(
    ("module", "function"),
    [
        ("modules.generation_parameters_copypaste", "paste_func"),  # SD.Next, A1111 <= 1.7
        ("modules.infotext_utils", "paste_func"),  # A1111 1.8-1.9: same name, no try
        ("some_extension", "read_infotext"),
    ],
)
def test_other_callers_get_a_logged_message_and_no_value(caplog, module, function):
    # SD.Next's and older A1111's paste call the targets outside any try, as Neo's does.
    from pladis.webui.infotext import paste_alpha

    with caplog.at_level("ERROR", logger="pladis"):
        assert _call_as(module, function, paste_alpha, BAD) is None
    assert len(caplog.records) == 1 and "PLADIS alpha" in caplog.records[0].getMessage()
