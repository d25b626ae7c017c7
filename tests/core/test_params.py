"""PladisParams: defaults, loose parsing, and one error per kind of bad value, naming the parameter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pladis.params import DEFAULT_LAYERS, LAYER_GROUPS, PladisParams, params_from_mapping, parse_params


def test_defaults_are_the_official_choices() -> None:
    p = PladisParams()
    assert (p.enabled, p.alpha, p.lam, p.layers, p.start, p.end) == (
        False,
        1.5,
        2.0,
        ("down", "up"),
        0.0,
        1.0,
    )
    assert DEFAULT_LAYERS == ("down", "up") and LAYER_GROUPS == ("down", "mid", "up")
    assert not p.acts


def test_is_frozen() -> None:
    with pytest.raises(AttributeError):
        PladisParams().alpha = 2.0  # type: ignore[misc]


def test_loose_values_from_ui_infotext_xyz_and_api() -> None:
    p = parse_params(
        enabled="True", alpha="1.75", lam=np.float32(2.5), layers="up+down", start=np.int64(0), end="0.8"
    )
    assert p == PladisParams(enabled=True, alpha=1.75, lam=2.5, layers=("down", "up"), start=0.0, end=0.8)
    assert parse_params(enabled=1, layers=["mid", "down"]).layers == ("down", "mid")
    assert parse_params(layers="all").layers == LAYER_GROUPS
    assert parse_params(layers="none").layers == ()
    assert parse_params(layers="down, mid").layers == ("down", "mid")
    assert parse_params(layers="Down UP").layers == ("down", "up")  # case and a bare space, as typed
    assert parse_params(layers=[" Up ", "MID"]).layers == ("mid", "up")  # an API list, likewise
    words = {"on": True, " Yes ": True, "OFF": False, "": False}  # loose words, as the API may send
    assert {word: parse_params(enabled=word).enabled for word in words} == words
    assert parse_params(enabled=np.bool_(True)).enabled is True
    assert parse_params() == PladisParams()
    assert isinstance(parse_params(alpha=2).alpha, float)


def test_mapping_with_aliases_and_base() -> None:
    p = params_from_mapping({"enabled": True, "lambda": "3", "layers": ["up"], "start": 0.1, "end": None})
    assert (p.enabled, p.lam, p.layers, p.start, p.end) == (True, 3.0, ("up",), 0.1, 1.0)
    assert params_from_mapping({"alpha": 2}, base=p).lam == 3.0
    # None (an API null) keeps the base's value, field by field
    kept = params_from_mapping(
        {"enabled": None, "alpha": None, "lam": None, "layers": None, "start": None}, base=p
    )
    assert kept == p
    assert params_from_mapping({"alpha": None}, base=PladisParams(alpha=1.8)).alpha == 1.8


def test_replace_revalidates() -> None:
    p = PladisParams(enabled=True)
    assert p.replace(alpha="2").alpha == 2.0
    with pytest.raises(ValueError, match="alpha"):
        p.replace(alpha=3)
    with pytest.raises(ValueError, match=r"'lam' and 'scale' both set lam"):  # as in API dicts
        p.replace(lam=1, scale=2)


def test_window_semantics() -> None:
    p = PladisParams(enabled=True, start=0.25, end=0.5)
    assert [p.active_at(x) for x in (0.0, 0.25, 0.49, 0.5, 0.9)] == [False, True, True, False, False]
    full = PladisParams(enabled=True)
    assert full.active_at(0.0) and full.active_at(1.0)
    # X/Y/Z's np.arange writes 0.3 and 0.7 as 0.30000000000000004 and 0.7000000000000001: the step at
    # exactly 0.3 is in, the one at 0.7 out, as for typed bounds.
    rounded = PladisParams(enabled=True, start=0.1 + 0.2, end=0.7000000000000001)
    assert [rounded.active_at(x) for x in (0.29, 0.3, 0.6, 0.7)] == [False, True, True, False]
    assert not PladisParams(enabled=True, lam=0.0).acts
    assert not PladisParams(enabled=True, layers=()).acts
    assert not PladisParams(enabled=True, start=0.5, end=0.5).acts
    # α = 1 is softmax: the blend is the stock attention, so nothing needs installing
    assert not PladisParams(enabled=True, alpha=1.0).acts
    assert not PladisParams(enabled=True, alpha=1.0).changes_attention
    assert PladisParams(enabled=True, alpha=1.05).acts
    # layers aside (Flux has no layer choice)
    assert PladisParams(enabled=True, layers=()).changes_attention
    assert PladisParams(enabled=True).layers_text() == "down+up"


BAD_CASES = {
    "alpha below range": ({"alpha": 0.5}, r"alpha: 0\.5 is outside the allowed range \[1, 2\]"),
    "alpha above range": ({"alpha": 2.5}, r"alpha: 2\.5 is outside the allowed range \[1, 2\]"),
    "alpha nan": ({"alpha": math.nan}, r"alpha: nan is outside the allowed range \[1, 2\]"),
    "alpha inf": ({"alpha": math.inf}, r"alpha: inf is outside the allowed range \[1, 2\]"),
    "alpha beyond float": ({"alpha": 10**400}, r"alpha: inf is outside the allowed range \[1, 2\]"),
    "lambda below float": ({"lam": -(10**400)}, r"lambda: -inf is outside the allowed range \[0, 10\]"),
    "alpha wrong type": ({"alpha": [1.5]}, r"alpha: expected a number in \[1, 2\], got \[1\.5\]"),
    "alpha not a number string": ({"alpha": "high"}, r"alpha: expected a number in \[1, 2\], got 'high'"),
    "alpha boolean": ({"alpha": True}, r"alpha: expected a number in \[1, 2\], got the boolean True"),
    "lambda negative": ({"lam": -0.1}, r"lambda: -0\.1 is outside the allowed range \[0, 10\]"),
    "lambda too large": ({"lam": 11}, r"lambda: 11(\.0)? is outside the allowed range \[0, 10\]"),
    "lambda nan": ({"lam": "nan"}, r"lambda: nan is outside the allowed range \[0, 10\]"),
    "lambda inf": ({"lam": "inf"}, r"lambda: inf is outside the allowed range \[0, 10\]"),
    "lambda wrong type": ({"lam": object()}, r"lambda: expected a number in \[0, 10\], got <object"),
    "start not a number": ({"start": "soon"}, r"start: expected a number in \[0, 1\], got 'soon'"),
    "end boolean": ({"end": False}, r"end: expected a number in \[0, 1\], got the boolean False"),
    "start negative": ({"start": -0.1}, r"start: -0\.1 is outside the allowed range \[0, 1\]"),
    "end above one": ({"end": 1.5}, r"end: 1\.5 is outside the allowed range \[0, 1\]"),
    "end nan": ({"end": math.nan}, r"end: nan is outside the allowed range \[0, 1\]"),
    "start after end": (
        {"start": 0.8, "end": 0.2},
        r"start/end: start \(0\.8\) must not be greater than end \(0\.2\)",
    ),
    "unknown layer group": (
        {"layers": "down+middle"},
        r"layers: unknown layer group 'middle'; allowed groups: down, mid, up",
    ),
    "layers wrong type": ({"layers": 3}, r"layers: expected a collection of layer groups"),
    "layers as bytes": ({"layers": b"down"}, r"layers: expected a collection of layer groups .* got b'down'"),
    "lambda with a digit separator": ({"lam": "1_0"}, r"lambda: expected a number in \[0, 10\], got '1_0'"),
    "alpha text beyond float": ({"alpha": "1e400"}, r"alpha: '1e400' is outside the allowed range \[1, 2\]"),
    "alpha array": ({"alpha": np.array([1.5, 2.0])}, r"alpha: expected a single value, got array"),
    "enabled tensor": (
        {"enabled": torch.tensor([True, False])},
        r"enabled: expected a single value, got tensor",
    ),
    "layers as a mapping": (
        {"layers": {"down": True, "mid": False}},
        r"layers: expected a list such as \['down', 'up'\] .* got the mapping",
    ),
    "enabled not a boolean": ({"enabled": "maybe"}, r"enabled: expected true or false, got 'maybe'"),
    "enabled number other than 0/1": ({"enabled": 2}, r"enabled: expected true or false, got 2"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_each_invalid_parameter_raises_value_error_naming_it(case: str) -> None:
    kwargs, message = BAD_CASES[case]
    with pytest.raises(ValueError, match=message):
        parse_params(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 2.5}, r"alpha: 2\.5 is outside"),
        ({"lam": -1.0}, r"lambda: -1\.0 is outside"),
        ({"enabled": "yes"}, r"enabled: expected true or false"),
        ({"layers": "down"}, r"layers: expected a collection"),
        ({"layers": ("down", "top")}, r"layers: unknown layer group 'top'"),
        ({"layers": {"up": False}}, r"layers: expected a list"),
        ({"start": 0.9, "end": 0.1}, r"start/end"),
        ({"alpha": True}, r"alpha: expected a number in \[1, 2\], got True of type bool"),
        ({"lam": False}, r"lambda: expected a number in \[0, 10\], got False of type bool"),
    ],
)
def test_the_constructor_validates_too(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PladisParams(**kwargs)


def test_unknown_mapping_key_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"unknown parameter 'alhpa'"):
        params_from_mapping({"alhpa": 1.5})
    with pytest.raises(ValueError, match="expected a mapping"):
        params_from_mapping([1.5])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "mapping", [{"lam": 3, "lambda": 4}, {"Alpha": 1.5, "alpha": 2}, {"lam": None, "lambda": 1}]
)
def test_a_parameter_given_twice_under_two_names_is_an_error(mapping: dict) -> None:
    first, second = list(mapping)
    with pytest.raises(ValueError, match=rf"PLADIS: '{first}' and '{second}' both set \w+; give it once"):
        params_from_mapping(mapping)


def test_constructor_takes_numpy_and_torch_bools():
    assert PladisParams(enabled=np.bool_(True)).enabled is True
    assert PladisParams(enabled=torch.tensor(False)).enabled is False
    with pytest.raises(ValueError, match="PLADIS enabled: expected true or false"):
        PladisParams(enabled=np.int64(1))


def test_start_rounded_just_above_end_is_end():
    # X/Y/Z and scripts compute 0.1 + 0.2 = 0.30000000000000004: "start 0.3 > end 0.3" was an error.
    params = parse_params(enabled=True, start=0.1 + 0.2, end=0.3)
    assert params.start == params.end == 0.3
    with pytest.raises(ValueError, match="start"):
        parse_params(enabled=True, start=0.3001, end=0.3)


def test_nan_progress_is_outside_the_window():
    assert not PladisParams(enabled=True).active_at(math.nan)
