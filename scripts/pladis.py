"""PLADIS always-on script (AUTOMATIC1111, Forge, reForge): WebUI glue only, logic lives in ``pladis/``.

The WebUI loads this file by path with the extension root on ``sys.path``, so the ``pladis`` package
next to it is importable here at the top.
"""

from modules import script_callbacks, scripts

from pladis.webui import ui, xyz
from pladis.webui.controller import CONTROLLER


class PladisScript(scripts.Script):
    sorting_priority = 15  # Forge: UI placement among built-ins (ignored by A1111)

    def title(self):
        return "PLADIS"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return ui.build(self, is_img2img)

    def process(self, p, *args):
        CONTROLLER.process(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        CONTROLLER.before_sampling(p)

    def postprocess(self, p, processed, *args):
        CONTROLLER.postprocess(p)


script_callbacks.on_cfg_denoiser(CONTROLLER.on_cfg_denoiser)
script_callbacks.on_model_loaded(CONTROLLER.on_model_loaded)
script_callbacks.on_script_unloaded(CONTROLLER.unload)
script_callbacks.on_before_ui(xyz.register)
