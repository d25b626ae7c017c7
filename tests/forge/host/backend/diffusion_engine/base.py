"""Stand-in for Forge ``backend/diffusion_engine/base.py``: the ``forge_objects`` holder.

A plain class, as in Forge: it takes attributes and weak references (``SimpleNamespace`` takes no
weak reference). ``processing.py`` re-assigns ``sd_model.forge_objects`` from
``forge_objects_after_applying_lora.shallow_copy()`` before every sampling pass.
"""


class ForgeObjects:
    def __init__(self, unet, clip=None, vae=None, clipvision=None):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)
