"""Stand-in ``modules.sd_models``: checkpoint switching with ``on_model_loaded`` as in sd_models.py:940-1002.

Switching to another checkpoint replaces ``shared.sd_model`` with a *different object* and fires
``model_loaded_callback``; asking for the current one does nothing (:955-956); ``forced_reload``
reloads weights into the same object and fires the callback again (:994). With
``opts.sd_checkpoints_limit > 1`` a model loaded before is reused from the cache without the callback
("Using already loaded model", ``reuse_model_from_already_loaded`` :878-919).
"""

from modules import script_callbacks, shared

checkpoints = {}
main_checkpoint = None
loaded = set()  # checkpoints loaded so far: what the cache holds when sd_checkpoints_limit > 1


def register(info, model, main=False):
    global main_checkpoint
    checkpoints[info] = model
    if main or main_checkpoint is None:
        main_checkpoint = info
        shared.sd_model = model
        loaded.add(info)


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    info = info if info is not None else main_checkpoint
    model = checkpoints[info]
    if shared.sd_model is model and not forced_reload:
        return shared.sd_model
    reused = shared.sd_model is not model and info in loaded and shared.opts.sd_checkpoints_limit > 1
    shared.sd_model = model
    loaded.add(info)
    if not reused:
        script_callbacks.model_loaded_callback(model)
    return model


class SkipWritingToConfig:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
