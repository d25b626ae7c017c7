"""Stand-in for Forge Neo's ``backend/nn/flux.py`` (Haoming02/sd-webui-forge-classic, neo branch,
as of commit 06d6af9).

What differs from Forge's, as in Neo:

- the module-level ``attention(q, k, v, pe, mask=None, transformer_options={})`` applies RoPE only
  when ``pe`` is not None and calls ``attention_function(q, k, v, heads, skip_reshape=True,
  mask=mask, transformer_options=transformer_options)`` (Neo's back-ends take it in ``**kwargs``);
- ``DoubleStreamBlock.forward(img, txt, vec, pe, attn_mask=None, ..., transformer_options={})`` and
  ``SingleStreamBlock.forward(x, vec, pe, attn_mask=None, ..., transformer_options={})`` call it as
  ``attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)``;
- the model's ``forward(x, timestep, context, ..., transformer_options={}, **kwargs)`` gets the
  per-call dict from ``KModel.apply_model``, takes the mask from its ``attention_mask`` keyword, and
  hands both to every block call; before the blocks it writes ``total_blocks``, ``block_type`` and
  ``block_index`` into that same dict (no copy), so attention sees the caller's object.

Not modelled: Neo's ``patches_replace["dit"]`` block replacement, modulation, MLPs and ref latents.
Forge's stand-in (``backend.nn.flux``) supplies the layers; the module has its own name here so both
hosts can be loaded at once (PLADIS resolves the module from the blocks).
"""

import torch

from backend.attention_neo import attention_function
from backend.nn import flux
from backend.nn.flux import apply_rope, split_heads


def attention(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006 (Neo's signature)
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    heads = q.shape[1]
    return attention_function(
        q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=transformer_options
    )


class DoubleStreamBlock(flux.DoubleStreamBlock):
    flipped_img_txt = False

    def forward(
        self,
        img,
        txt,
        vec,
        pe,
        attn_mask=None,
        modulation_dims_img=None,
        modulation_dims_txt=None,
        transformer_options={},  # noqa: B006 (Neo's signature)
    ):
        img_q, img_k, img_v = split_heads(self.img_qkv(img), self.num_heads)
        txt_q, txt_k, txt_v = split_heads(self.txt_qkv(txt), self.num_heads)
        first, second = ((img_q, img_k, img_v), (txt_q, txt_k, txt_v))
        if not self.flipped_img_txt:
            first, second = second, first
        q, k, v = (torch.cat((a, b), dim=2) for a, b in zip(first, second, strict=True))
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        if self.flipped_img_txt:
            img_attn, txt_attn = attn[:, : img.shape[1]], attn[:, img.shape[1] :]
        else:
            txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        return img + self.img_proj(img_attn), txt + self.txt_proj(txt_attn)


class SingleStreamBlock(flux.SingleStreamBlock):
    def forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):  # noqa: B006
        q, k, v = split_heads(self.linear1(x), self.num_heads)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        return x + self.linear2(attn)


class IntegratedFluxTransformer2DModel(flux.IntegratedFluxTransformer2DModel):
    double_class = DoubleStreamBlock
    single_class = SingleStreamBlock

    def forward(
        self,
        x,
        timestep,
        context,
        y=None,
        guidance=None,
        ref_latents=None,
        control=None,
        transformer_options={},  # noqa: B006 (Neo's signature)
        **kwargs,
    ):
        attn_mask = kwargs.get("attention_mask")
        img, txt, pe = self.embed(x, context)
        transformer_options["total_blocks"] = len(self.double_blocks)
        transformer_options["block_type"] = "double"
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            img, txt = block(
                img=img,
                txt=txt,
                vec=None,
                pe=pe,
                attn_mask=attn_mask,
                transformer_options=transformer_options,
            )
        joint = torch.cat((txt, img), 1)
        transformer_options["total_blocks"] = len(self.single_blocks)
        transformer_options["block_type"] = "single"
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            joint = block(
                joint, vec=None, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options
            )
        return self.final(joint[:, txt.shape[1] :])
