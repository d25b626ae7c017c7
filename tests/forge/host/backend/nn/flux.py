"""Stand-in for Forge ``backend/nn/flux.py`` (documented interface, tiny sizes).

What matters for an attention patch, as in Forge: the module-level ``attention(q, k, v, pe)`` applies
RoPE (``apply_rope``) and calls ``attention_function(q, k, v, heads, skip_reshape=True)`` with
``(B, H, L, D)`` tensors, returning ``(B, L, H·D)``; double-stream blocks concatenate ``[text; image]``
tokens, single-stream blocks run on the joint sequence; blocks resolve ``attention`` from this
module's globals at call time. Text positions are all zero, so RoPE leaves text tokens unchanged.
"""

import torch
from torch import nn

from backend.attention import attention_function


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], skip_reshape=True)


def rope(pos, dim, theta=10000.0):
    """Per-position 2×2 rotation matrices ``(B, L, dim/2, 2, 2)`` for rotary embedding."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = pos.double().unsqueeze(-1) * freqs
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).view(*angles.shape, 2, 2).float()


def apply_rope(xq, xk, freqs_cis):
    """Rotate consecutive channel pairs of q and k by the per-position matrices in ``freqs_cis``."""

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]
        return out.reshape(*x.shape).type_as(x)

    return rotate(xq), rotate(xk)


def positions_to_pe(ids, head_dim):
    return rope(ids, head_dim).unsqueeze(1)


def split_heads(qkv, heads):
    b, length, _ = qkv.shape
    return qkv.view(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.num_heads = heads
        self.img_qkv = nn.Linear(hidden, 3 * hidden)
        self.txt_qkv = nn.Linear(hidden, 3 * hidden)
        self.img_proj = nn.Linear(hidden, hidden)
        self.txt_proj = nn.Linear(hidden, hidden)

    def call_attention(self, q, k, v, pe):
        return attention(q, k, v, pe=pe)

    def forward(self, img, txt, vec, pe):
        img_q, img_k, img_v = split_heads(self.img_qkv(img), self.num_heads)
        txt_q, txt_k, txt_v = split_heads(self.txt_qkv(txt), self.num_heads)
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = self.call_attention(q, k, v, pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        return img + self.img_proj(img_attn), txt + self.txt_proj(txt_attn)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.num_heads = heads
        self.linear1 = nn.Linear(hidden, 3 * hidden)
        self.linear2 = nn.Linear(hidden, hidden)

    def call_attention(self, q, k, v, pe):
        return attention(q, k, v, pe=pe)

    def forward(self, x, vec, pe):
        q, k, v = split_heads(self.linear1(x), self.num_heads)
        return x + self.linear2(self.call_attention(q, k, v, pe))


class IntegratedFluxTransformer2DModel(nn.Module):
    double_class = DoubleStreamBlock
    single_class = SingleStreamBlock

    def __init__(self, in_channels=4, context_dim=6, hidden=8, heads=2, depth=2, depth_single=2):
        super().__init__()
        self.num_heads = heads
        self.img_in = nn.Linear(in_channels, hidden)
        self.txt_in = nn.Linear(context_dim, hidden)
        self.double_blocks = nn.ModuleList([self.double_class(hidden, heads) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([self.single_class(hidden, heads) for _ in range(depth_single)])
        self.final = nn.Linear(hidden, in_channels)

    def embed(self, x, context):
        """Image and text tokens and their RoPE matrices (text positions zero, image ``1..N``)."""
        img, txt = self.img_in(x), self.txt_in(context)
        b, n, t = x.shape[0], x.shape[1], context.shape[1]
        txt_ids = torch.zeros(b, t)
        img_ids = torch.arange(1, n + 1, dtype=torch.float32).expand(b, n)
        pe = positions_to_pe(torch.cat((txt_ids, img_ids), dim=1), img.shape[-1] // self.num_heads)
        return img, txt, pe

    def forward(self, x, timestep, context, y=None, guidance=None, **kwargs):
        img, txt, pe = self.embed(x, context)
        t = txt.shape[1]
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=None, pe=pe)
        joint = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            joint = block(joint, vec=None, pe=pe)
        return self.final(joint[:, t:])
