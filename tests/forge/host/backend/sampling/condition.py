"""Stand-in for Forge ``backend/sampling/condition.py``: how contexts of different lengths are batched.

Forge (like ComfyUI) batches cond and uncond contexts of different token lengths by repeating each
shorter one along the token axis up to the least common multiple, if that is at most 4× the shorter.
"""

import math

import torch


def lcm(a, b):
    return abs(a * b) // math.gcd(a, b)


class ConditionCrossAttn:
    def __init__(self, cond):
        self.cond = cond

    def can_concat(self, other):
        s1, s2 = self.cond.shape, other.cond.shape
        if s1 == s2:
            return True
        if s1[0] != s2[0] or s1[2] != s2[2]:
            return False
        return lcm(s1[1], s2[1]) // min(s1[1], s2[1]) <= 4

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        length = 1
        for c in conds:
            length = lcm(length, c.shape[1])
        return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in conds])
