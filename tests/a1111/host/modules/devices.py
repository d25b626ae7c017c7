"""Stand-in ``modules.devices`` (devices.py:125-235): autocast helpers and dtype casts."""

import contextlib

import torch

device = torch.device("cpu")
dtype = torch.float32
dtype_unet = torch.float32
unet_needs_upcast = False


def cond_cast_unet(tensor):
    return tensor.to(dtype_unet) if unet_needs_upcast else tensor


def cond_cast_float(tensor):
    return tensor.float() if unet_needs_upcast else tensor


def autocast(disable=False):
    if disable or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda")


def without_autocast(disable=False):
    return (
        torch.autocast("cuda", enabled=False)
        if torch.is_autocast_enabled() and not disable
        else contextlib.nullcontext()
    )
