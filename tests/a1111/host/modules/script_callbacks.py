"""Stand-in ``modules.script_callbacks`` (script_callbacks.py:45-69, 386-599 of v1.10.1).

Each callback runs inside try/except → ``errors.report`` like upstream; ``script_unloaded`` runs in
reverse registration order and ``before_ui`` callbacks in reversed order.
"""

from collections import namedtuple

from modules import errors

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


callback_map = {
    "callbacks_model_loaded": [],
    "callbacks_cfg_denoiser": [],
    "callbacks_script_unloaded": [],
    "callbacks_before_ui": [],
    "callbacks_infotext_pasted": [],
}


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def _add(name, callback):
    callback_map[name].append(ScriptCallback("<script>", callback, getattr(callback, "__name__", "cb")))


def _run(name, *args, reverse=False):
    callbacks = callback_map[name]
    for c in reversed(callbacks) if reverse else list(callbacks):
        try:
            c.callback(*args)
        except Exception:
            errors.report(f"Error executing callback {c.name} for {name}", exc_info=True)


def model_loaded_callback(sd_model):
    _run("callbacks_model_loaded", sd_model)


def cfg_denoiser_callback(params):
    _run("callbacks_cfg_denoiser", params)


def script_unloaded_callback():
    _run("callbacks_script_unloaded", reverse=True)


def before_ui_callback():
    _run("callbacks_before_ui", reverse=True)


def infotext_pasted_callback(infotext, params):
    _run("callbacks_infotext_pasted", infotext, params)


def on_model_loaded(callback):
    _add("callbacks_model_loaded", callback)


def on_cfg_denoiser(callback):
    _add("callbacks_cfg_denoiser", callback)


def on_script_unloaded(callback):
    _add("callbacks_script_unloaded", callback)


def on_before_ui(callback):
    _add("callbacks_before_ui", callback)


def on_infotext_pasted(callback):
    _add("callbacks_infotext_pasted", callback)


def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)
