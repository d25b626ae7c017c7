"""Stand-in for Forge ``modules/scripts.py``: the Script base class an always-on script subclasses."""


class AlwaysVisible:
    pass


class Script:
    sorting_priority = 0
    infotext_fields = None
    paste_field_names = None

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
