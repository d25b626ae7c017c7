"""Test helpers living next to the stand-in host (importable only while the ``host`` fixture is active).

Holds the *independent* PLADIS oracle (softmax + the ``entmax`` package, written here without any
``pladis`` code), model builders, script loading the way A1111 does it, and a generation runner.
"""

from __future__ import annotations

import copy
import os
import types

import gradio as gr
import torch
from entmax import entmax15, entmax_bisect, sparsemax
from ldm.models.diffusion.ddpm import LatentDiffusion
from modules import processing, scripts, sd_hijack_optimizations, sd_models, shared
from sgm.models.diffusion import DiffusionEngine

HOST_DIR = os.path.dirname(os.path.abspath(__file__))
EXT_ROOT = os.path.abspath(os.path.join(HOST_DIR, "..", "..", ".."))
SCRIPT_PATH = os.path.join(EXT_ROOT, "scripts", "pladis.py")
XYZ_DIR = os.path.join(HOST_DIR, "webui_scripts")
XYZ_PATH = os.path.join(XYZ_DIR, "xyz_grid.py")
GROUP_PREFIX = {"down": "input_blocks.", "mid": "middle_block.", "up": "output_blocks."}


# -- oracle -----------------------------------------------------------------------------------------
def oracle_weights(scores: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    """(1-λ)·softmax + λ·α-entmax of float64 scores, via the deep-spin ``entmax`` package."""
    dense = torch.softmax(scores, dim=-1)
    if alpha == 1.5:
        sparse = entmax15(scores, dim=-1)
    elif alpha == 2.0:
        sparse = sparsemax(scores, dim=-1)
    elif alpha == 1.0:
        sparse = dense
    else:
        sparse = entmax_bisect(scores, alpha=alpha, dim=-1, n_iter=200)
    return (1.0 - lam) * dense + lam * sparse


def oracle_attn2(module, x, context, alpha, lam):
    """attn2 with PLADIS maths in float64: projections as modules, hypernetworks like the stock forward."""
    from modules.hypernetworks import hypernetwork

    h = module.heads
    q = module.to_q(x)
    context = x if context is None else context
    context_k, context_v = hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)
    k = module.to_k(context_k)
    v = module.to_v(context_v)
    b, n, inner = q.shape
    d = inner // h

    def heads(t):
        return t.double().reshape(b, t.shape[1], h, d).permute(0, 2, 1, 3)

    scores = heads(q) @ heads(k).transpose(-1, -2) / (d**0.5)
    out = oracle_weights(scores, alpha, lam) @ heads(v)
    out = out.permute(0, 2, 1, 3).reshape(b, n, inner).to(q.dtype)
    return module.to_out(out)


def attn2_modules(model, groups=("down", "mid", "up")):
    unet = model.model.diffusion_model
    return [
        (name, m)
        for name, m in unet.named_modules()
        if name.endswith("attn2") and any(name.startswith(GROUP_PREFIX[g]) for g in groups)
    ]


def install_oracle(model, alpha, lam, layers=("down", "up"), gate=None):
    """Give the selected attn2 modules of ``model`` the oracle forward (when ``gate()`` is true)."""
    for _name, module in attn2_modules(model, layers):

        def forward(self, x, context=None, mask=None, **kwargs):
            if gate is None or gate():
                return oracle_attn2(self, x, context, alpha, lam)
            return type(self).forward(self, x, context=context, mask=mask, **kwargs)

        module.forward = types.MethodType(forward, module)
    return model


def progress_gate(model, steps):
    """gate() for txt2img with the stand-in sampler: progress = 1 - sigma = i/steps, from the UNet input."""
    seen = {"t": 1.0}

    def hook(_module, args, kwargs):
        seen["t"] = float(kwargs["timesteps"].reshape(-1)[0])

    model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, (lambda: 1.0 - seen["t"])


def instance_forwards(model):
    """Names of attn2 modules that currently carry an instance ``forward`` (i.e. are patched)."""
    return sorted(name for name, m in attn2_modules(model) if "forward" in m.__dict__)


# -- models -----------------------------------------------------------------------------------------
def sd15(seed=0, name="sd15", **kwargs):
    return LatentDiffusion(seed=seed, name=name, **kwargs).eval()


def sdxl(seed=1, name="sdxl", **kwargs):
    return DiffusionEngine(seed=seed, name=name, **kwargs).eval()


def use_models(main, *others):
    sd_models.checkpoints.clear()
    sd_models.loaded.clear()
    sd_models.main_checkpoint = None
    sd_models.register(main.sd_checkpoint_info, main, main=True)
    for model in others:
        sd_models.register(model.sd_checkpoint_info, model)


# -- inputs -----------------------------------------------------------------------------------------
def inputs(batch=1, tokens=6, channels=32, ctx_tokens=77, ctx_dim=24, uncond_tokens=None, seed=123, n_iter=1):
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(batch, tokens, channels, generator=g) for _ in range(n_iter)]
    cond = torch.randn(batch, ctx_tokens, ctx_dim, generator=g) * 2
    uncond = torch.randn(batch, uncond_tokens or ctx_tokens, ctx_dim, generator=g) * 2
    return {"noise": noise if n_iter > 1 else noise[0], "cond": cond, "uncond": uncond, "n_iter": n_iter}


# -- WebUI: scripts and runners ---------------------------------------------------------------------
def load_extension():
    """Load scripts/pladis.py (and the X/Y/Z stand-in) as A1111's ``load_scripts`` does."""
    data = scripts.load_scripts_from([(EXT_ROOT, SCRIPT_PATH), (XYZ_DIR, XYZ_PATH)])
    return {d.script_class.__module__: d for d in data}


def make_runner(is_img2img=False):
    runner = scripts.ScriptRunner()
    runner.initialize_scripts(is_img2img)
    with gr.Blocks():
        runner.setup_ui()
    return runner


def pladis_script(runner):
    return next(s for s in runner.alwayson_scripts if s.title() == "PLADIS")


def default_args(runner):
    return [None] + [getattr(c, "value", None) for c in runner.inputs[1:]]


def script_args(runner, *values):
    """Full ``p.script_args`` with PLADIS' slice set from ``values`` (UI order)."""
    args = default_args(runner)
    script = pladis_script(runner)
    for i, value in enumerate(values):
        args[script.args_from + i] = value
    return tuple(args)


def api_script_args(runner, alwayson_scripts):
    """``Api.init_script_args`` for always-on scripts (api.py:335-361): positional copy over defaults."""
    args = default_args(runner)
    for name, request in alwayson_scripts.items():
        script = next(s for s in runner.alwayson_scripts if s.title().lower() == name.lower())
        given = request.get("args", [])
        for idx in range(min(script.args_to - script.args_from, len(given))):
            args[script.args_from + idx] = given[idx]
    return tuple(args)


def txt2img(runner=None, args=(), data=None, steps=4, **kwargs):
    data = data or inputs()
    p = processing.StableDiffusionProcessingTxt2Img(
        data["cond"],
        data["uncond"],
        data["noise"],
        steps=steps,
        n_iter=data["n_iter"],
        scripts=runner,
        script_args=args,
        **kwargs,
    )
    return p


def run(p):
    res = processing.process_images(p)
    return torch.cat(res.images), res


def baseline_copy(model):
    return copy.deepcopy(model)


def apply_sdp():
    sd_hijack_optimizations.apply()
