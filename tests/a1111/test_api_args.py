"""Script args: positional, short and dict forms; bad values fail the request with their message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pladis.params import PladisParams
from pladis.webui.args import params_from_args


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((True, 1.5, 2.0, ["down", "up"], 0.0, 1.0), PladisParams(True)),
        ((True,), PladisParams(True)),
        ((True, 2.0), PladisParams(True, alpha=2.0)),
        ((), PladisParams()),
        ((True, None, 3, None, None, 0.5), PladisParams(True, lam=3.0, end=0.5)),
        (
            ("true", "1.75", "1.5", "down+mid", "0.1", "0.9"),
            PladisParams(True, 1.75, 1.5, ("down", "mid"), 0.1, 0.9),
        ),
        (
            (np.bool_(True), np.float32(2.0), np.float64(1.0), "all"),
            PladisParams(True, 2.0, 1.0, ("down", "mid", "up")),
        ),
        (
            ({"enabled": True, "alpha": 2.0, "lambda": 1.0, "layers": ["up"]},),
            PladisParams(True, 2.0, 1.0, ("up",)),
        ),
        (({"alpha": 1.5},), PladisParams(True)),  # dict form: enabled defaults to true
        (({"enabled": False, "lam": 4},), PladisParams(False, lam=4.0)),
        ((None, 5.0), PladisParams()),  # enabled null is off, as false: its bad values are unused
        ((False, 5.0), PladisParams()),
        (  # the positions after the dict: UI defaults
            ({"lambda": 2.5, "start": 0.2, "end": 0.8}, 1.5, 2.0, ["down", "up"], 0.0, 1.0),
            PladisParams(True, lam=2.5, start=0.2, end=0.8),
        ),
        (  # ... or a request's infotext values, which the fields the dict leaves out keep
            ({"lambda": 3}, 1.75, 1.0, ["mid"], 0.2, 0.8),
            PladisParams(True, 1.75, 3.0, ("mid",), 0.2, 0.8),
        ),
        (({"enabled": None, "lambda": 1},), PladisParams(lam=1.0)),  # explicit null: off, as positional
    ],
)
def test_args_parse(args, expected):
    assert params_from_args(args) == expected


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ((True, 3.0), ["alpha", "[1, 2]"]),
        ((True, 0.5), ["alpha", "[1, 2]"]),
        ((True, 1.5, 11.0), ["lambda", "[0, 10]"]),
        ((True, 1.5, -1.0), ["lambda", "[0, 10]"]),
        ((True, 1.5, "strong"), ["lambda"]),
        ((True, 1.5, 2.0, "sideways"), ["layers", "down, mid, up"]),
        ((True, 1.5, 2.0, ["down"], 1.5), ["start", "[0, 1]"]),
        ((True, 1.5, 2.0, ["down"], 0.0, -0.1), ["end", "[0, 1]"]),
        ((True, 1.5, 2.0, ["down"], 0.8, 0.2), ["start", "end"]),
        (("maybe",), ["enabled"]),
        (({"alpha": 9},), ["alpha", "[1, 2]"]),
        (({"lambda": 2.0, "sharpness": 3},), ["sharpness"]),
        ((True, 1.5, 2.0, ["down"], 0.0, 1.0, "extra"), ["at most 6", "got 7"]),
    ],
)
def test_bad_values_name_parameter_and_range(args, fragments):
    with pytest.raises(ValueError) as info:
        params_from_args(args)
    assert all(fragment in str(info.value) for fragment in fragments), str(info.value)


def test_hook_exceptions_are_swallowed_by_the_webui(webui):
    """Why validation cannot raise from process(): the stand-in, like A1111, logs hook errors and goes on."""

    class Failing(webui.scripts.Script):
        def title(self):
            return "failing"

        def show(self, is_img2img):
            return webui.scripts.AlwaysVisible

        def process(self, p, *args):
            raise ValueError("ignored")

    runner = webui.scripts.ScriptRunner()
    runner.alwayson_scripts.append(Failing())
    kit = webui.kit
    kit.use_models(kit.sd15())
    kit.run(kit.txt2img(runner, (None,)))
    assert [str(e) for _, e in webui.errors.reported] == ["ignored"]


@pytest.mark.parametrize(
    ("request_args", "fragments"),
    [
        ([True, 2.5], ["PLADIS alpha", "2.5", "[1, 2]"]),
        ([{"enabled": True, "lambda": 12}], ["PLADIS lambda", "12", "[0, 10]"]),
        ([True, 1.5, 2.0, ["down"], 0.7, 0.3], ["start", "0.7", "end", "0.3"]),
    ],
)
def test_bad_api_value_fails_request_and_leaves_model_untouched(webui, request_args, fragments):
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    baseline_model = kit.baseline_copy(model)
    kit.use_models(baseline_model)
    baseline, _ = kit.run(kit.txt2img(None, (), data=data))

    kit.use_models(model)
    args = kit.api_script_args(webui.runner, {"PLADIS": {"args": request_args}})
    p = kit.txt2img(webui.runner, args, data=data, is_api=True)
    p.extra_generation_params["PLADIS alpha"] = 1.0  # left over from an earlier X/Y/Z cell
    with pytest.raises(ValueError) as info:  # the API turns this into HTTP 500 {"errors": message}
        kit.run(p)
    assert all(fragment in str(info.value) for fragment in fragments)
    assert not any(k.startswith("PLADIS") for k in p.extra_generation_params)
    assert kit.instance_forwards(model) == []
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    # the next request is normal
    out, _ = kit.run(kit.txt2img(webui.runner, kit.api_script_args(webui.runner, {}), data=data, is_api=True))
    assert torch.equal(out, baseline)


def test_api_short_and_dict_args_generate(webui):
    kit = webui.kit
    model = kit.sd15()
    data = kit.inputs()
    oracle_model = kit.install_oracle(kit.baseline_copy(model), 2.0, 1.0, layers=("up",))
    kit.use_models(oracle_model)
    expected, _ = kit.run(kit.txt2img(None, (), data=data))
    kit.use_models(model)
    for request in (
        {"args": [True, 2.0, 1.0, ["up"]]},
        {"args": [{"alpha": 2, "lambda": 1, "layers": "up"}]},
    ):
        args = kit.api_script_args(webui.runner, {"pladis": request})
        out, res = kit.run(kit.txt2img(webui.runner, args, data=data, is_api=True))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        assert res.extra_generation_params["PLADIS layers"] == "up"
