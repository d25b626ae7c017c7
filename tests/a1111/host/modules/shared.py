"""Stand-in ``modules.shared``: options, job state, the current model and loaded hypernetworks."""

from types import SimpleNamespace


class State:
    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0

    def interrupt(self):
        self.interrupted = True


opts = SimpleNamespace(
    batch_cond_uncond=True,  # shared_options.py:242 default True
    upcast_attn=False,  # shared_options.py:182
    pad_cond_uncond=False,
    pad_cond_uncond_v0=False,
    refiner_switch_by_sample_steps=True,
    sd_checkpoints_limit=1,  # shared_options.py default: every switch loads the checkpoint again
)
cmd_opts = SimpleNamespace(api=False, nowebui=False)
state = State()
sd_model = None
loaded_hypernetworks: list = []
