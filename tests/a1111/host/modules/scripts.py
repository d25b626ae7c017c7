"""Stand-in ``modules.scripts`` (scripts.py of v1.10.1): Script API, loading and always-on dispatch.

Faithful points: ``AlwaysVisible``; ``elem_id`` includes the tab; scripts load by path with the
extension root prepended to ``sys.path`` only while loading (:510-524) after ``clear_callbacks``
(:491); one instance per tab; ``name`` set only when ``ui()`` returned controls (:653); args are
sliced ``p.script_args[args_from:args_to]``; **every hook call is wrapped in try/except →
errors.report** (:820-930), so an exception in a hook does not stop the generation.
"""

import inspect
import os
import re
import sys
from collections import namedtuple

from modules import errors, script_callbacks, script_loading

AlwaysVisible = object()

ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


def load_scripts_from(script_paths):
    """``load_scripts`` for given ``(basedir, path)`` pairs: clears callbacks, then loads by path."""
    script_callbacks.clear_callbacks()
    scripts_data.clear()
    for basedir, path in script_paths:
        syspath = sys.path
        try:
            sys.path = [basedir, *sys.path]
            module = script_loading.load_module(path)
            for _key, script_class in module.__dict__.items():
                if (
                    inspect.isclass(script_class)
                    and issubclass(script_class, Script)
                    and script_class is not Script
                ):
                    scripts_data.append(ScriptClassData(script_class, path, basedir, module))
        finally:
            sys.path = syspath
    return scripts_data


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.alwayson_scripts = []
        self.selectable_scripts = []
        self.inputs = [None]
        self.infotext_fields = []
        self.paste_field_names = []

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        for script_data in scripts_data:
            script = script_data.script_class()
            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        controls = script.ui(script.is_img2img)
        if controls is None:
            return
        script.name = script.title().lower()
        script.controls = controls
        self.inputs.extend(controls)
        script.args_to = len(self.inputs)
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names

    def setup_ui(self):
        for script in self.alwayson_scripts:
            self.create_script_ui(script)

    def _each(self, hook, p, *head, **kwargs):
        for script in self.alwayson_scripts:
            try:
                script_args = p.script_args[script.args_from : script.args_to]
                getattr(script, hook)(p, *head, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def before_hr(self, p):
        self._each("before_hr", p)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)


_ = os
