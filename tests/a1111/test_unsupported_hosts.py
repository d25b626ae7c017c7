"""A1111-style hosts PLADIS cannot drive (SD.Next): a clear message, no patch, no PLADIS infotext."""

from __future__ import annotations

import sys
import types

import pytest
from torch import nn

from pladis.hosts import a1111
from pladis.webui.controller import GENERATION_ATTR, Controller

ENABLED = (True, 1.5, 2.0, ["down", "up"], 0.0, 1.0)


def _ldm_model():
    model = types.SimpleNamespace(model=nn.Module())
    model.model.diffusion_model = nn.Sequential(nn.Linear(2, 2))
    return model


def _host(monkeypatch, *, before_every_sampling: bool, denoiser: bool) -> None:
    """``modules.scripts`` / ``modules.script_callbacks`` as SD.Next (neither) or A1111 has them."""
    runner = type("ScriptRunner", (), {})
    if before_every_sampling:
        runner.process_before_every_sampling = lambda self, p, **kwargs: None
    if denoiser:

        def init(
            self,
            x,
            image_cond,
            sigma,
            sampling_step,
            total_sampling_steps,
            text_cond,
            text_uncond,
            denoiser=None,
        ):
            pass

    else:  # SD.Next (original backend): no denoiser, so the generation's p is out of reach

        def init(self, x, image_cond, sigma, sampling_step, total_sampling_steps, tensor, uncond):
            pass

    params = type("CFGDenoiserParams", (), {"__init__": init})
    monkeypatch.setitem(sys.modules, "modules.scripts", types.SimpleNamespace(ScriptRunner=runner))
    monkeypatch.setitem(
        sys.modules, "modules.script_callbacks", types.SimpleNamespace(CFGDenoiserParams=params)
    )


@pytest.mark.parametrize(
    ("before_every_sampling", "denoiser", "supported"),
    [(True, True, True), (False, True, True), (True, False, True), (False, False, False)],
)
def test_a_host_needs_one_of_the_two_sampling_hooks(monkeypatch, before_every_sampling, denoiser, supported):
    # A1111 1.6–1.9 have on_cfg_denoiser with the denoiser but no process_before_every_sampling.
    _host(monkeypatch, before_every_sampling=before_every_sampling, denoiser=denoiser)
    reason = a1111.unsupported_reason(_ldm_model())
    assert (reason is None) == supported
    if not supported:
        assert "process_before_every_sampling" in reason and "on_cfg_denoiser" in reason


def test_a_model_without_an_ldm_unet_is_unsupported(monkeypatch):
    _host(monkeypatch, before_every_sampling=True, denoiser=True)
    diffusers_pipeline = types.SimpleNamespace(unet=nn.Linear(2, 2))  # SD.Next's diffusers backend
    assert "sd_model.model.diffusion_model" in a1111.unsupported_reason(diffusers_pipeline)
    assert a1111.unsupported_reason(None) is None  # no model to judge yet: not refused


@pytest.mark.parametrize("case", ["no hooks", "diffusers model"])
def test_process_on_an_unsupported_host_says_so_and_writes_no_infotext(monkeypatch, caplog, case):
    _host(monkeypatch, before_every_sampling=False, denoiser=case != "no hooks")
    monkeypatch.setattr("pladis.hosts.detect_host", lambda: "a1111")
    model = _ldm_model() if case == "no hooks" else types.SimpleNamespace(unet=nn.Linear(2, 2))
    p = types.SimpleNamespace(sd_model=model, extra_generation_params={"PLADIS alpha": 1.75, "Steps": 20})
    with caplog.at_level("WARNING", logger="pladis"):
        Controller(a1111.Attn2Patcher()).process(p, ENABLED)
    assert getattr(p, GENERATION_ATTR) is None  # nothing will patch
    assert p.extra_generation_params == {"Steps": 20}
    assert [r.getMessage() for r in caplog.records] == [f"PLADIS is off: {a1111.unsupported_reason(model)}"]


def test_process_on_a_supported_host_configures_the_generation(monkeypatch):
    _host(monkeypatch, before_every_sampling=False, denoiser=True)
    monkeypatch.setattr("pladis.hosts.detect_host", lambda: "a1111")
    p = types.SimpleNamespace(sd_model=_ldm_model(), extra_generation_params={})
    Controller(a1111.Attn2Patcher()).process(p, ENABLED)
    assert getattr(p, GENERATION_ATTR) is not None
    assert p.extra_generation_params["PLADIS alpha"] == 1.5
