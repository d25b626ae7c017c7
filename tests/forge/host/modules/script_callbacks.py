"""Stand-in for ``modules/script_callbacks.py``: records registrations, nothing else."""

registered = []


def _register(kind):
    def register(callback, *args, **kwargs):
        registered.append((kind, callback))

    return register


on_cfg_denoiser = _register("cfg_denoiser")
on_model_loaded = _register("model_loaded")
on_script_unloaded = _register("script_unloaded")
on_before_ui = _register("before_ui")
on_infotext_pasted = _register("infotext_pasted")
