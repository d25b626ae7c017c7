"""X/Y/Z axes: registered once into the loaded xyz_grid.py module, validated, per-cell override."""

from __future__ import annotations

import types

import pytest
import torch

from pladis.webui import xyz


def _infotext(cell) -> dict[str, str]:
    """A cell's own generation parameters, from its infotext. Its ``extra_generation_params`` is the
    dict every cell shares (X/Y/Z cells are shallow copies of one p, as upstream), so it shows the last
    cell's values."""
    from modules.infotext_utils import parse_generation_parameters

    return parse_generation_parameters(cell.infotexts[0])


def _xyz(webui):
    return webui.loaded["xyz_grid.py"]


def _refused_axis_message(webui, label: str, values: str) -> str:
    """The error of an X/Y/Z plot whose axis ``label`` with text ``values`` is refused before the grid."""
    webui.script_callbacks.before_ui_callback()
    kit = webui.kit
    kit.use_models(kit.sd15())
    script = _xyz(webui).script_class()
    with pytest.raises(ValueError) as info:
        script.run_axis(kit.txt2img(webui.runner, kit.script_args(webui.runner, True)), label, values)
    return str(info.value)


def test_axes_register_once(webui):
    module = _xyz(webui).module
    webui.script_callbacks.before_ui_callback()  # what the WebUI does before building the UI
    labels = [o.label for o in module.axis_options]
    assert [lbl for lbl in labels if lbl.startswith("[PLADIS]")] == [a[0] for a in xyz.AXES]
    assert xyz.register() == 0  # duplicate-guarded
    webui.script_callbacks.before_ui_callback()
    assert [o.label for o in module.axis_options] == labels
    enabled = next(o for o in module.axis_options if o.label == "[PLADIS] Enabled")
    assert enabled.choices() == ["False", "True"]


def test_axes_are_there_when_the_ui_is_built_before_the_before_ui_callbacks(host):
    # --nowebui: Api.__init__ builds the UI (X/Y/Z fixes its axis list in its own ui(), after the
    # always-on scripts') before webui.py runs the before_ui callbacks.
    host.loaded = host.kit.load_extension()
    module = host.loaded["xyz_grid.py"].module
    assert not [o for o in module.axis_options if o.label.startswith("[PLADIS]")]
    host.kit.make_runner(is_img2img=False)
    labels = [o.label for o in module.axis_options if o.label.startswith("[PLADIS]")]
    assert labels == [a[0] for a in xyz.AXES]


def test_register_counts_the_axes_it_adds(host):
    host.loaded = host.kit.load_extension()
    assert xyz.register() == len(xyz.AXES)
    assert xyz.register() == 0


def test_missing_or_foreign_xyz_module_is_fine(webui):
    assert xyz.register(scripts_data=[]) == 0
    # A script module under X/Y/Z's name without its axis API (another or an old plot): nothing added.
    foreign = type("Script", (), {"__module__": "xyz_grid.py"})
    assert xyz.register([types.SimpleNamespace(script_class=foreign, module=types.SimpleNamespace())]) == 0


@pytest.mark.parametrize(
    ("label", "values", "fragments"),
    [
        ("[PLADIS] Alpha", "1.5, 2.5", ["alpha", "[1, 2]"]),
        ("[PLADIS] Lambda", "2, 10.5", ["lambda", "[0, 10]"]),
        ("[PLADIS] Start", "1.2", ["start", "[0, 1]"]),
        ("[PLADIS] End", "-0.5", ["end", "[0, 1]"]),
    ],
)
def test_bad_axis_values_are_rejected_before_the_grid(webui, label, values, fragments):
    message = _refused_axis_message(webui, label, values)
    assert all(f in message for f in fragments)


def test_cells_override_ui_values(webui):
    webui.script_callbacks.before_ui_callback()
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    expected = {}
    for alpha in (1.5, 2.0):
        kit.use_models(kit.install_oracle(kit.baseline_copy(model), alpha, 0.5, layers=("down",)))
        expected[alpha], _ = kit.run(kit.txt2img(None, (), data=data))
    kit.use_models(kit.baseline_copy(model))
    baseline, _ = kit.run(kit.txt2img(None, (), data=data))

    kit.use_models(model)
    script = _xyz(webui).script_class()
    # UI says alpha 1.5, lambda 0.5, layers down; the axis overrides alpha per cell
    p = kit.txt2img(webui.runner, kit.script_args(webui.runner, True, 1.5, 0.5, ["down"]), data=data)
    cells = script.run_axis(p, "[PLADIS] Alpha", "2.0, 1.5")
    torch.testing.assert_close(torch.cat(cells[0].images), expected[2.0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(cells[1].images), expected[1.5], atol=1e-5, rtol=1e-4)
    assert _infotext(cells[0])["PLADIS alpha"] == "2.0" and _infotext(cells[1])["PLADIS alpha"] == "1.5"
    assert not hasattr(p, "_pladis_xyz")  # the parent p is never modified

    # Enabled axis: "False" cell is stock and carries no PLADIS keys even though the dict is shared
    p = kit.txt2img(webui.runner, kit.script_args(webui.runner, True, 2.0, 0.5, ["down"]), data=data)
    on, off = script.run_axis(p, "[PLADIS] Enabled", "True, False")
    torch.testing.assert_close(torch.cat(on.images), expected[2.0], atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.cat(off.images), baseline)
    assert "PLADIS alpha" in _infotext(on) and "PLADIS alpha" not in _infotext(off)
    assert kit.instance_forwards(model) == []


def _grid_with_ui(webui, start, end):
    """A model, the X/Y/Z script and a txt2img request whose accordion has PLADIS on at start/end."""
    webui.script_callbacks.before_ui_callback()
    kit = webui.kit
    model = kit.sd15()
    kit.use_models(model)
    p = kit.txt2img(webui.runner, kit.script_args(webui.runner, True, 1.5, 2.0, ["down"], start, end))
    return model, _xyz(webui).script_class(), p


def test_start_after_end_cell_fails_that_cell_only(webui):
    kit = webui.kit
    model, script, p = _grid_with_ui(webui, 0.6, 1.0)
    cells = script.run_axis(p, "[PLADIS] End", "0.5, 0.9")
    assert cells[0] is None and cells[1] is not None  # X/Y/Z reports the failed cell and goes on
    assert "start" in str(webui.errors.reported[-1][1])
    assert kit.instance_forwards(model) == []


def test_float_ranges_of_the_xyz_syntax_reach_the_bounds(webui):
    # X/Y/Z expands "1-2 (+0.1)" with np.arange(start, end + step, step), whose last value is
    # 2.000000000000001: the grid must not be refused for that rounding.
    import numpy as np

    from pladis.webui.xyz import make_confirm

    alphas = np.arange(1.0, 2.0 + 0.1, 0.1)
    ends = np.arange(0.2, 1.0 + 0.1, 0.1)
    assert alphas[-1] > 2.0 and ends[-1] > 1.0  # the rounding this is about
    make_confirm("alpha")(None, list(alphas))
    make_confirm("end")(None, list(ends))
    with pytest.raises(ValueError, match=r"alpha: 2\.001 is outside the allowed range \[1, 2\]"):
        make_confirm("alpha")(None, [2.001])


@pytest.mark.parametrize(
    ("label", "text", "last", "advice"),
    [
        ("[PLADIS] Alpha", "1.5-2 (+0.1)", "2.1000000000000005", "'1.5-2 [6]'"),
        ("[PLADIS] Alpha", "1.2-2 (+0.2)", "2.1999999999999997", "'1.2-2 [5]'"),
        ("[PLADIS] Start", "0.5-0 (-0.2)", "-0.10000000000000009", "'0.5-0.1 [3]'"),
        ("[PLADIS] Alpha", "1.1, 1.5-2 (+0.1), 1.3", "2.1000000000000005", "'1.5-2 [6]'"),
    ],
)
def test_a_range_that_np_arange_carries_past_its_end_is_refused_with_advice(webui, label, text, last, advice):
    # Upstream's own expansion (np.arange(a, b + step, step)) adds a value one step past b for
    # these: the grid is refused (the value is out of range), and the message says why and what
    # to write instead, since the user never typed that value.
    message = _refused_axis_message(webui, label, text)
    assert f"{last} is outside the allowed range" in message and advice in message, message
    assert "np.arange" not in message  # a user-facing message: the cause in the WebUI's terms


def test_an_out_of_range_value_typed_by_hand_gets_no_range_advice(webui):
    from pladis.webui.xyz import make_confirm

    for values in ([1.5, 2.5], [1.2, 1.4, 1.6, 1.8, 2.5], [2.5], [1.2, 1.4, "x"]):
        with pytest.raises(ValueError) as info:
            make_confirm("alpha")(None, values)
        assert "X/Y/Z range" not in str(info.value) and "PLADIS alpha" in str(info.value)


def test_an_end_axis_can_repair_the_accordions_start_after_end(webui):
    # UI at start 0.8 / end 0.2: the End axis's values are merged before validation.
    kit = webui.kit
    model, script, p = _grid_with_ui(webui, 0.8, 0.2)
    cells = script.run_axis(p, "[PLADIS] End", "0.9, 1")
    assert all(cell is not None for cell in cells)
    assert [_infotext(c)["PLADIS range"] for c in cells] == ["0.8-0.9", "0.8-1"]
    assert kit.instance_forwards(model) == []


def test_float_range_cells_keep_the_step_at_their_start(webui):
    # "0.2-0.3 (+0.1)" gives the Start cells 0.2 and 0.30000000000000004 (np.arange): the second cell
    # must start at step 3 of 10 (progress 0.3), as a typed "0.3" does, and its infotext says 0.3.
    webui.script_callbacks.before_ui_callback()
    kit = webui.kit
    model, data, steps = kit.sd15(), kit.inputs(), 10
    copy = kit.baseline_copy(model)
    _, progress = kit.progress_gate(copy, steps)
    kit.install_oracle(copy, 1.5, 2.0, layers=("down",), gate=lambda: round(progress() * steps) >= 3)
    kit.use_models(copy)
    expected, _ = kit.run(kit.txt2img(None, (), data=data, steps=steps))

    kit.use_models(model)
    script = _xyz(webui).script_class()
    args = kit.script_args(webui.runner, True, 1.5, 2.0, ["down"])
    cells = script.run_axis(
        kit.txt2img(webui.runner, args, data=data, steps=steps), "[PLADIS] Start", "0.2-0.3 (+0.1)"
    )
    assert len(cells) == 2 and all(cell is not None for cell in cells)
    torch.testing.assert_close(torch.cat(cells[1].images), expected, atol=1e-5, rtol=1e-4)
    assert _infotext(cells[1])["PLADIS range"] == "0.3-1"
    assert kit.instance_forwards(model) == []


def test_a_value_axis_turns_pladis_on_unless_an_enabled_axis_says_otherwise(webui):
    # With the accordion left off, a "[PLADIS] Lambda" grid gave identical stock cells. A value axis
    # now turns PLADIS on; an Enabled axis still decides, whichever axis it is on.
    webui.script_callbacks.before_ui_callback()
    kit = webui.kit
    model, data = kit.sd15(), kit.inputs()
    kit.use_models(kit.install_oracle(kit.baseline_copy(model), 1.5, 3.0, layers=("down", "up")))
    expected, _ = kit.run(kit.txt2img(None, (), data=data))
    kit.use_models(kit.baseline_copy(model))
    baseline, _ = kit.run(kit.txt2img(None, (), data=data))

    kit.use_models(model)
    script = _xyz(webui).script_class()
    args = kit.script_args(webui.runner, False, 1.5, 2.0, ["down", "up"])
    zero, three = script.run_axis(kit.txt2img(webui.runner, args, data=data), "[PLADIS] Lambda", "0, 3")
    assert torch.equal(torch.cat(zero.images), baseline)  # λ = 0 is the stock model
    torch.testing.assert_close(torch.cat(three.images), expected, atol=1e-5, rtol=1e-4)
    assert _infotext(three)["PLADIS lambda"] == "3.0" and _infotext(zero)["PLADIS lambda"] == "0.0"

    p = kit.txt2img(webui.runner, args, data=data)
    p._pladis_xyz = {"enabled": "False"}  # as an Enabled axis applied before the Lambda axis
    (cell,) = script.run_axis(p, "[PLADIS] Lambda", "3")
    assert torch.equal(torch.cat(cell.images), baseline) and "PLADIS lambda" not in _infotext(cell)
    assert p._pladis_xyz == {"enabled": "False"}  # a cell (a shallow copy of p) writes a new dict
    assert kit.instance_forwards(model) == []


def test_a_failing_xyz_module_costs_the_axes_not_the_accordion(host, monkeypatch, caplog):
    host.loaded = host.kit.load_extension()
    module = host.loaded["xyz_grid.py"].module

    def broken(*args, **kwargs):
        raise TypeError("AxisOption() got an unexpected keyword argument 'confirm'")

    monkeypatch.setattr(module, "AxisOption", broken)
    with caplog.at_level("WARNING", logger="pladis"):
        runner = host.kit.make_runner(is_img2img=False)
    script = host.kit.pladis_script(runner)
    assert script.args_to - script.args_from == 6  # the six controls were built
    assert any("could not add the X/Y/Z axes" in r.getMessage() for r in caplog.records)
