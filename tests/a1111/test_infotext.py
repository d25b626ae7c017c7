"""Infotext keys: written when enabled, removed when disabled, and pasted back into every control."""

from __future__ import annotations

import pytest

from pladis.params import PladisParams
from pladis.webui import infotext


def _paste(webui, text):
    script = webui.kit.pladis_script(webui.runner)
    fields = webui.infotext_utils.parse_generation_parameters(text)
    return webui.infotext_utils.paste_values(script.infotext_fields, fields), fields


@pytest.mark.parametrize(
    "values",
    [
        (True, 1.5, 2.0, ["down", "up"], 0.0, 1.0),
        (True, 2.0, 0.75, ["mid"], 0.2, 0.8),
        (True, 1.35, 4.95, ["down", "mid", "up"], 0.05, 0.55),
        (True, 1.5, 2.0, ["down", "up"], 0.00005, 0.99995),  # the API takes any fraction: no "5e-05"
        (True, 1.23456789012345, 4e-05, ["down", "up"], 0.0, 1.0),  # 4 decimals lost both (λ → off)
        (True, 4 / 3, 2.0, ["up"], 0.0, 1.0),  # X/Y/Z's "1-2 [4]"
    ],
)
def test_infotext_round_trip_restores_every_control(webui, values):
    kit = webui.kit
    kit.use_models(kit.sd15())
    _, res = kit.run(kit.txt2img(webui.runner, kit.script_args(webui.runner, *values)))
    text = res.infotexts[0]
    start, end = values[4:]
    written = {0.0: "0", 1.0: "1", 0.00005: "0.00005", 0.99995: "0.99995"}
    assert f"PLADIS range: {written.get(start, start)}-{written.get(end, end)}" in text  # positional
    pasted, fields = _paste(webui, text)
    numbers = [0, 1, 2, 4, 5]  # 15 significant digits: 4/3 comes back as 1.33333333333333
    assert [pasted[i] for i in numbers] == pytest.approx([values[i] for i in numbers], rel=1e-14, abs=0)
    assert pasted[3] == values[3]
    assert [type(v) for v in pasted] == [bool, float, float, list, float, float]
    params = infotext.params_from_infotext(fields)
    assert params == PladisParams(*pasted[:3], tuple(values[3]), *pasted[4:])


def test_paste_without_pladis_turns_it_off_and_leaves_the_rest(webui):
    pasted, fields = _paste(webui, "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7")
    assert pasted == [False, None, None, None, None, None]
    assert infotext.params_from_infotext(fields) == PladisParams(enabled=False)


def test_params_from_infotext_is_on_exactly_when_the_alpha_key_is_there():
    # As the accordion's paste (paste_enabled): the other keys alone do not turn PLADIS on, and
    # missing ones keep their defaults.
    assert infotext.params_from_infotext({"PLADIS alpha": "2"}) == PladisParams(True, 2.0)
    fields = {"PLADIS lambda": "3", "PLADIS layers": "up", "PLADIS range": "0.2-0.8"}
    assert infotext.params_from_infotext(fields) == PladisParams(enabled=False)


@pytest.mark.parametrize(
    ("start", "text"),
    [(0.1 + 0.2, "0.3-1"), (3e-8, "0.00000003-1"), (0.123456789012345, "0.123456789012345-1")],
)
def test_range_text_drops_float_noise_but_keeps_real_digits(start, text):
    # X/Y/Z's np.arange noise (0.30000000000000004) goes; a value the API was given keeps its digits.
    assert infotext.range_text(PladisParams(True, start=start)) == text
    assert infotext.parse_range(text)[0] == pytest.approx(start, rel=1e-14, abs=0)


def test_keys_are_removed_when_disabled_because_xyz_shares_the_dict():
    extra = {"Other": 1}
    infotext.write(extra, PladisParams(True, 2.0, 1.0, ("up",), 0.25, 0.5))
    assert extra == {
        "Other": 1,
        "PLADIS alpha": 2.0,
        "PLADIS lambda": 1.0,
        "PLADIS layers": "up",
        "PLADIS range": "0.25-0.5",
    }
    infotext.write(extra, PladisParams(False, 2.0))
    assert extra == {"Other": 1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.2-0.8", (0.2, 0.8)),
        (" 0 - 1 ", (0.0, 1.0)),
        ("5e-05-1", (5e-05, 1.0)),
        ("1e-20-2E-1", (1e-20, 0.2)),
    ],
)
def test_range_parses_positional_and_exponent_notation(text, expected):
    assert infotext.parse_range(text) == expected


@pytest.mark.parametrize("text", ["0.5", "0.1-0.2-0.3", "0.2--0.5", "a-b", "-", "0.5-", ""])
def test_malformed_range_names_the_key(text):
    with pytest.raises(ValueError, match="PLADIS range: expected 'start-end' with fractions in \\[0, 1\\]"):
        infotext.parse_range(text)


def test_keys_fit_the_webui_infotext_grammar(webui):
    pattern = webui.infotext_utils.re_param
    for key in infotext.KEYS:
        assert pattern.fullmatch(f"{key}: 1") is not None


_BAD_PASTES = [
    ("PLADIS alpha: strong", 1, ["PLADIS alpha", "[1, 2]", "'strong'"]),
    ("PLADIS alpha: 5", 1, ["PLADIS alpha", "[1, 2]"]),
    ("PLADIS lambda: 12", 2, ["PLADIS lambda", "[0, 10]"]),
    ("PLADIS layers: sideways", 3, ["PLADIS layers", "down, mid, up", "'sideways'"]),
    ("PLADIS range: soon", 4, ["PLADIS range", "start-end", "'soon'"]),
    ("PLADIS range: 0.2-0.5-0.9", 4, ["PLADIS range", "start-end"]),
    ("PLADIS range: 0.2-1.5", 4, ["PLADIS end", "[0, 1]", "PLADIS range: 0.2-1.5"]),
    # a leading minus is the start's sign, not the separator: the message names the bound at fault
    ("PLADIS range: -0.2-0.5", 4, ["PLADIS start: -0.2 is outside the allowed range [0, 1]"]),
]


@pytest.mark.parametrize(("bad", "control", "fragments"), _BAD_PASTES)
def test_a_bad_pladis_value_in_an_api_infotext_fails_the_request_naming_it(webui, bad, control, fragments):
    # The API's infotext field (api.py apply_infotext) sets the script args from the same paste
    # targets and lets their errors through: a malformed value must fail the request with a message
    # naming it, not run PLADIS with the defaults (None = "not mentioned") or fail in the host's own
    # float() ("could not convert string to float", naming neither PLADIS nor the range).
    script = webui.kit.pladis_script(webui.runner)
    good = "x\nSteps: 3, PLADIS alpha: 1.5, PLADIS lambda: 2, PLADIS layers: down+up, PLADIS range: 0-1"
    key = bad.split(":")[0]
    text = ", ".join([part for part in good.split(", ") if not part.startswith(key)] + [bad])
    with pytest.raises(ValueError) as info:
        webui.infotext_utils.api_script_values(script.infotext_fields, text)
    assert all(fragment in str(info.value) for fragment in fragments), str(info.value)
    assert webui.infotext_utils.api_script_values(script.infotext_fields, good) == [
        True,
        1.5,
        2.0,
        ["down", "up"],
        0.0,
        1.0,
    ]


@pytest.mark.parametrize(("bad", "control", "fragments"), _BAD_PASTES)
def test_a_bad_pladis_value_pasted_in_the_ui_is_reported_and_leaves_its_control(
    webui, bad, control, fragments
):
    # The UI paste (infotext_utils.connect_paste) reports a failing target and leaves its control
    # unchanged; the others are pasted.
    pasted, _ = _paste(webui, f"x\nSteps: 3, PLADIS alpha: 1.75, PLADIS lambda: 3, {bad}")
    expected = [True, 1.75, 3.0, None, None, None]
    expected[control] = None
    if control == 4:
        expected[5] = None  # start and end come from the one range value
    assert pasted == expected
    messages = [str(error) for _, error in webui.errors.reported]
    assert messages and all(fragment in messages[-1] for fragment in fragments), messages


def test_send_to_img2img_copies_every_control(webui):
    # "Send to img2img" copies the controls whose infotext target is in paste_field_names; with only
    # the α and λ keys listed, the img2img accordion stayed off (or kept stale layers and window).
    source = webui.runner
    target = webui.kit.make_runner(is_img2img=True)
    pairs = webui.infotext_utils.send_to_pairs(
        source.infotext_fields, target.infotext_fields, target.paste_field_names
    )
    controls = [
        runner.inputs[script.args_from : script.args_to]
        for runner in (source, target)
        for script in [webui.kit.pladis_script(runner)]
    ]
    assert pairs == list(zip(*controls, strict=True))
