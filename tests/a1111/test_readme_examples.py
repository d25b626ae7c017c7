"""README.md's user-facing examples, read from README at test time and run through the real code.

Each helper below pulls one example out of README by its heading and its wording, and fails naming
the heading when the example is no longer there, so that neither the README nor the code can drift
away from the other without a test noticing. Nothing in README is executed: JSON is parsed with
``json``, the Python payload with ``ast.literal_eval``.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import pytest
import torch

from pladis.params import PladisParams
from pladis.webui.args import params_from_args

README = Path(__file__).resolve().parents[2] / "README.md"


def _section(heading: str) -> str:
    """The text under ``heading`` (a whole line, e.g. ``## API``) up to the next heading of any level.

    Headings are matched outside code blocks only: a ``# restart`` comment in a bash block is not one.
    """
    lines, out, inside, fenced = README.read_text(encoding="utf-8").splitlines(), [], False, False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            if inside:
                break
            inside = line.strip() == heading
            continue
        if inside:
            out.append(line)
    assert out, f"README.md has no section {heading!r}"
    return "\n".join(out)


def _code_block(heading: str, language: str, containing: str = "") -> str:
    """The first ```language block under ``heading`` whose text contains ``containing``."""
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", _section(heading), re.S | re.M):
        if lang == language and containing in body:
            return body
    raise AssertionError(f"README.md section {heading!r}: no ```{language} block containing {containing!r}")


def _find(heading: str, pattern: str) -> re.Match:
    """``pattern`` searched in the section's prose; the failure says which sentence went missing."""
    match = re.search(pattern, _section(heading), re.S)
    assert match, f"README.md section {heading!r}: no text matching {pattern!r}"
    return match


def _documented_arg_order() -> list[str]:
    """The positional order the API section promises, e.g. ``[enabled, alpha, lambda, ...]``."""
    order = _find("## API", r"control order\s+`\[([^\]]+)\]`").group(1)
    return [name.strip() for name in order.split(",")]


def _documented_params(args: list) -> PladisParams:
    """What README says positional args mean, built without the code's own parser: the args named
    by the documented order, unnamed fields at the Usage table's defaults."""
    named = dict(zip(_documented_arg_order(), args, strict=False))
    layers = named.get("layers", ["down", "up"])
    return PladisParams(
        enabled=bool(named.get("enabled")),
        alpha=float(named.get("alpha", 1.5)),
        lam=float(named.get("lambda", 2.0)),
        layers=tuple(layers.split("+") if isinstance(layers, str) else layers),
        start=float(named.get("start", 0.0)),
        end=float(named.get("end", 1.0)),
    )


def _generate_from_api(webui, alwayson_scripts: dict, steps: int, expected: PladisParams):
    """Run an API request's ``alwayson_scripts`` and the independent oracle for ``expected``;
    returns (PLADIS image, oracle image, infotext)."""
    kit = webui.kit
    model, data = kit.sd15(), kit.inputs()
    assert expected.enabled and (expected.start, expected.end) == (0.0, 1.0)  # the oracle has no window
    oracle = kit.install_oracle(kit.baseline_copy(model), expected.alpha, expected.lam, expected.layers)
    kit.use_models(oracle)
    want, _ = kit.run(kit.txt2img(None, (), data=data, steps=steps))
    kit.use_models(model)
    args = kit.api_script_args(webui.runner, alwayson_scripts)
    got, res = kit.run(kit.txt2img(webui.runner, args, data=data, steps=steps, is_api=True))
    assert kit.instance_forwards(model) == []  # the model is left as it was
    return got, want, res.infotexts[0]


def _has_fields(infotext: str, fields: str) -> bool:
    """Whether ``fields`` (``"Key: value, Key: value"``) appear whole in the infotext's parameter line:
    a plain substring test would take ``lambda: 2`` for ``lambda: 2.0`` and ``0-1`` for ``0-1.0``."""
    return re.search(rf"(?:^|, ){re.escape(fields)}(?:,|$)", infotext.splitlines()[-1]) is not None


# -- API ----------------------------------------------------------------------------------------------
def test_the_curl_example_generates_with_the_args_it_sends(webui):
    block = _code_block("## API", "bash", "curl")
    match = re.search(r"-d '(.*)'", block, re.S)
    assert match, "README.md section '## API': the curl example has no -d '<json>' body"
    payload = json.loads(match.group(1))
    (request,) = payload["alwayson_scripts"].values()
    expected = _documented_params(request["args"])
    got, want, text = _generate_from_api(webui, payload["alwayson_scripts"], payload["steps"], expected)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert _has_fields(text, f"PLADIS alpha: {expected.alpha}, PLADIS lambda: {expected.lam}"), text


def test_the_python_example_generates_and_writes_the_infotext_its_comment_promises(webui):
    source = _code_block("## API", "python", "payload")
    tree = ast.parse(source)
    values = [
        n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "payload"
    ]
    assert len(values) == 1, "README.md section '## API': the Python example has no single `payload = {...}`"
    payload = ast.literal_eval(values[0])
    (request,) = payload["alwayson_scripts"].values()
    (fields,) = request["args"]  # the single-dict form
    expected = PladisParams(True, fields["alpha"], fields["lambda"], tuple(fields["layers"].split("+")))
    got, want, text = _generate_from_api(webui, payload["alwayson_scripts"], payload["steps"], expected)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    promised = re.search(r'result\["info"\]\)\s*#\s*contains "(.*?)(?:, \.\.\.)?"', source)
    assert promised, (
        "README.md section '## API': the print(result[\"info\"]) line lost its '# contains' comment"
    )
    assert _has_fields(text, promised.group(1)), text


def test_the_documented_error_message_is_the_one_the_request_fails_with(webui):
    message = json.loads("{" + _find("## API", r'(`"errors": "[^"`]+"`)').group(1).strip("`") + "}")["errors"]
    shape = re.fullmatch(r"PLADIS (\w+): (\S+) is outside the allowed range \[.*\]", message)
    assert shape, f"README.md section '## API': the error example {message!r} is not a range error"
    name, value = shape.groups()
    args = [True, None, None, None, None, None]
    args[_documented_arg_order().index(name)] = float(value)
    kit = webui.kit
    kit.use_models(kit.sd15())
    p = kit.txt2img(webui.runner, kit.api_script_args(webui.runner, {"PLADIS": {"args": args}}), is_api=True)
    with pytest.raises(ValueError) as info:  # the API answers HTTP 500 with {"errors": str(error)}
        kit.run(p)
    assert str(info.value) == message


def _documented_dict_keys() -> dict[str, list[str]]:
    """README's ``Dict keys: `enabled` (or `enable`), ...`` as {documented key: [its aliases]}."""
    text = _find("## API", r"Dict keys: (.*?)\. Unknown keys are rejected\.").group(1)
    keys = {}
    for key, aliases in re.findall(r"`(\w+)`(?:\s+\(or\s+([^)]*)\))?", text):
        keys[key] = re.findall(r"`(\w+)`", aliases)
    return keys


def test_every_documented_dict_key_and_alias_sets_its_field_and_no_other_key_is_accepted():
    samples = {"enabled": False, "alpha": 2.0, "lambda": 3.0, "layers": "mid", "start": 0.25, "end": 0.75}
    documented = _documented_dict_keys()
    order = _documented_arg_order()
    assert list(documented) == order, "the dict keys and the positional order name different fields"
    for position, (key, aliases) in enumerate(documented.items()):
        positional = [True, None, None, None, None, None]
        positional[position] = samples[key]
        expected = params_from_args(positional)
        assert expected != PladisParams(True), f"sample for {key!r} is the default: the check proves nothing"
        for name in [key, *aliases]:
            assert params_from_args([{name: samples[key]}]) == expected, name
    with pytest.raises(ValueError, match=r"unknown parameter 'sharpness'; known parameters: (.*)") as info:
        params_from_args([{"sharpness": 3}])
    known = re.search(r"known parameters: (.*)", str(info.value)).group(1).split(", ")
    assert sorted(known) == sorted(n for k, a in documented.items() for n in [k, *a])


def test_the_documented_layers_spellings_are_accepted():
    text = _find("## API", r"`layers` is a list (.*?)\.\n").group(1)
    spellings = [json.loads(s) for s in re.findall(r"`([^`]+)`", text)]
    assert spellings, "README.md section '## API': the layers sentence lists no spelling"
    for layers in spellings:
        params_from_args([True, None, None, layers])
    assert params_from_args([True, None, None, "none"]).layers == ()


# -- X/Y/Z ----------------------------------------------------------------------------------------------
def _xyz_script(webui):
    webui.script_callbacks.before_ui_callback()
    return webui.loaded["xyz_grid.py"].script_class()


def test_the_documented_axes_are_the_registered_ones(webui):
    _xyz_script(webui)
    registered = [o.label for o in webui.loaded["xyz_grid.py"].module.axis_options if "PLADIS" in o.label]
    listed = _find("## X/Y/Z plot", r"PLADIS adds the axes (.*?)\.").group(1)
    assert re.findall(r"\*\*(\[PLADIS\] [^*]+)\*\*", listed) == registered
    mentioned = set(re.findall(r"\*\*(\[PLADIS\] [^*]+)\*\*", _section("## X/Y/Z plot")))
    assert mentioned <= set(registered), mentioned - set(registered)


def test_the_documented_axis_values_run_and_lambda_zero_is_the_stock_model(webui):
    # "X type **[PLADIS] Lambda**, values `0, 1, 2, 3`. Y type **[PLADIS] Alpha**, values `1.5, 2`"
    # and "X type **[PLADIS] Enabled** with `False, True`"; the accordion is left off ("optional").
    script, kit = _xyz_script(webui), webui.kit
    axes = dict(
        re.findall(r"\*\*(\[PLADIS\] \w+)\*\*,? (?:values|with) `([^`]+)`", _section("## X/Y/Z plot"))
    )
    assert {"[PLADIS] Lambda", "[PLADIS] Alpha", "[PLADIS] Enabled"} <= set(axes), axes
    model, data = kit.sd15(), kit.inputs()
    kit.use_models(kit.baseline_copy(model))
    stock, _ = kit.run(kit.txt2img(None, (), data=data))
    kit.use_models(model)
    p = kit.txt2img(webui.runner, kit.script_args(webui.runner, False), data=data)
    lambdas = [v.strip() for v in axes["[PLADIS] Lambda"].split(",")]
    assert lambdas[0] == "0", "the recipe's 'λ = 0 column' is its first X value"
    y_axis = next(o for o in webui.loaded["xyz_grid.py"].module.axis_options if o.label == "[PLADIS] Alpha")
    alphas = [y_axis.type(v) for v in axes["[PLADIS] Alpha"].split(",")]
    y_axis.confirm(p, alphas)
    for alpha in alphas:
        row = copy.copy(p)  # the Y value applied to the row, as X/Y/Z does before the X cells
        y_axis.apply(row, alpha, alphas)
        cells = script.run_axis(row, "[PLADIS] Lambda", axes["[PLADIS] Lambda"])
        assert len(cells) == len(lambdas) and None not in cells
        assert torch.equal(torch.cat(cells[0].images), stock), f"α {alpha}: the λ = 0 cell is not stock"
        assert not torch.equal(torch.cat(cells[-1].images), stock)
    switches = [v.strip() for v in axes["[PLADIS] Enabled"].split(",")]
    cells = script.run_axis(p, "[PLADIS] Enabled", axes["[PLADIS] Enabled"])
    assert sorted(switches) == ["False", "True"]
    for switch, cell in zip(switches, cells, strict=True):
        assert torch.equal(torch.cat(cell.images), stock) == (switch == "False"), switch
    assert kit.instance_forwards(model) == []


def test_the_documented_float_range_refusal_and_its_advice(webui):
    found = _find(
        "## X/Y/Z plot",
        r"`([^`]+\(\+[^`]+\))`\s+ends\s+at\s+([\d.]+),\s+which\s+(\S+)\s+refuses\):\s+write\s+`([^`]+)`",
    )
    refused, last, symbol, advice = found.groups()
    label = {"α": "[PLADIS] Alpha", "λ": "[PLADIS] Lambda"}[symbol]
    script, kit = _xyz_script(webui), webui.kit
    kit.use_models(kit.sd15())
    p = kit.txt2img(webui.runner, kit.script_args(webui.runner, True))
    with pytest.raises(ValueError) as info:
        script.run_axis(p, label, refused)
    shown = re.search(r": (\S+) is outside the allowed range", str(info.value)).group(1)
    assert float(shown) == pytest.approx(float(last)) and f"'{advice}'" in str(info.value), str(info.value)
    cells = script.run_axis(p, label, advice)
    assert None not in cells and len(cells) == int(re.search(r"\[(\d+)\]", advice).group(1))


# -- infotext -------------------------------------------------------------------------------------------
_INFOTEXT = "### Generation parameters (infotext)"


def test_the_documented_infotext_line_is_written_and_pastes_back(webui):
    line = _code_block(_INFOTEXT, "", "PLADIS alpha").strip()
    kit = webui.kit
    kit.use_models(kit.sd15())
    script = kit.pladis_script(webui.runner)
    fields = webui.infotext_utils.parse_generation_parameters(f"a prompt\nSteps: 20, {line}")
    pasted = webui.infotext_utils.paste_values(script.infotext_fields, fields)
    _, res = kit.run(kit.txt2img(webui.runner, kit.script_args(webui.runner, *pasted)))
    assert _has_fields(res.infotexts[0], line), res.infotexts[0]  # pasted, they write the same line
    alpha, lam = (float(fields[k]) for k in ("PLADIS alpha", "PLADIS lambda"))
    start, end = (float(x) for x in fields["PLADIS range"].split("-"))
    assert pasted == [True, alpha, lam, fields["PLADIS layers"].split("+"), start, end]


def test_the_documented_malformed_paste_is_reported_and_leaves_its_control(webui):
    bad = _find(_INFOTEXT, r"\(`(PLADIS \w+: [^`]+)`\) is reported").group(1)
    key = bad.split(":")[0]
    script = webui.kit.pladis_script(webui.runner)
    fields = webui.infotext_utils.parse_generation_parameters(f"x\nSteps: 3, {bad}")
    pasted = webui.infotext_utils.paste_values(script.infotext_fields, fields)
    assert pasted[_documented_arg_order().index(key.split()[1])] is None  # left as it was
    assert key in str(webui.errors.reported[-1][1])
