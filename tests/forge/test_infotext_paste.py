"""Infotext paste on Forge Classic/Neo, whose UI paste calls the targets outside any ``try``."""

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
    from modules.infotext_utils import SKIP, _parse_info

    from pladis.webui.infotext import PASTE_TARGETS

    pasted = [
        _parse_info(control, target, fields) for control, target in zip(CONTROLS, PASTE_TARGETS, strict=True)
    ]
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


def test_elsewhere_a_bad_value_still_raises_naming_it(forge_host):
    # The API's infotext field and A1111's guarded UI paste get the error (tests/a1111/test_infotext.py).
    from pladis.webui.infotext import paste_alpha

    with pytest.raises(ValueError, match=r"PLADIS alpha.*\[1, 2\]"):
        paste_alpha({**GOOD, "PLADIS alpha": "5"})
