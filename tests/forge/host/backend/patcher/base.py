"""Stand-in for Forge ``backend/patcher/base.py`` (the parts an attention patch touches)."""

import copy


def set_model_options_patch_replace(model_options, patch, name, block_name, number, transformer_index=None):
    """Copy-on-write insert of ``patches_replace[name][key] = patch`` (as Forge does)."""
    to = model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
    key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    to["patches_replace"][name][key] = patch
    model_options["transformer_options"] = to
    return model_options


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, **kwargs):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.current_device = current_device
        self.patches = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_object_patch(self, name, obj):
        """As upstream: only recorded here; set on the shared model when the patcher is loaded."""
        self.object_patches[name] = obj

    def forge_patch_model(self, target_device=None):
        """As upstream (``base.py:257``): set this patcher's object patches on the shared model, keeping
        the originals; called when the patcher is loaded for sampling."""
        for name, item in self.object_patches.items():
            old = _get_attr(self.model, name)
            if name not in self.object_patches_backup:
                self.object_patches_backup[name] = old
            _set_attr(self.model, name, item)
        return self.model

    def forge_unpatch_model(self, target_device=None):
        """As upstream (``base.py:272``): put the originals back (another clone is being loaded)."""
        for name, backup in self.object_patches_backup.items():
            _set_attr(self.model, name, backup)
        self.object_patches_backup = {}

    def get_model_object(self, name):
        """As upstream: this patcher's object patch, else the loaded original, else the model's own."""
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return _get_attr(self.model, name)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.model_options = set_model_options_patch_replace(
            self.model_options, patch, name, block_name, number, transformer_index=transformer_index
        )

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        if "patches" not in to:
            to["patches"] = {}
        to["patches"][name] = to["patches"].get(name, []) + [patch]  # noqa: RUF005 - as upstream

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn2_output_patch(self, patch):
        self.set_model_patch(patch, "attn2_output_patch")

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def model_patches_to(self, device):
        """Forge calls ``.to`` (a device, then the model dtype) on every patch and on the UNet function
        wrapper that has one, each time the patcher is loaded: patches must not grow one by accident."""
        to = self.model_options["transformer_options"]
        for patch_list in to.get("patches", {}).values():
            for i in range(len(patch_list)):
                if hasattr(patch_list[i], "to"):
                    patch_list[i] = patch_list[i].to(device)
        for table in to.get("patches_replace", {}).values():
            for key in table:
                if hasattr(table[key], "to"):
                    table[key] = table[key].to(device)
        wrapper = self.model_options.get("model_function_wrapper")
        if hasattr(wrapper, "to"):
            self.model_options["model_function_wrapper"] = wrapper.to(device)


def _get_attr(obj, name):
    """``backend.utils.get_attr``: a dotted path, AttributeError if missing."""
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(obj, name, value):
    """``backend.utils.set_attr_raw``: set the last part of a dotted path."""
    *parents, last = name.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)
