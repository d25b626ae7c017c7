"""Stand-in for Forge ``modules/scripts.py``: the Script base class an always-on script subclasses."""

import re


class AlwaysVisible:
    pass


class Script:
    sorting_priority = 0
    infotext_fields = None
    paste_field_names = None
    is_txt2img = False
    is_img2img = False
    tabname = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        """Forge's id scheme (as A1111): ``script_<tab>_<title>_<item>`` for scripts shown on both tabs."""
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"
