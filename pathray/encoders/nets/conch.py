"""CONCH tile encoders (Mahmood Lab): the vision tower of CONCH v1 (a CoCa model) and CONCH
v1.5 (TITAN's tile encoder), with the official key names so the published checkpoints load
strictly.

* ``conch_v1_visual`` — ``CoCa.visual`` of ``mahmoodlab/CONCH``
  (``conch/open_clip_custom/{coca_model,vision_tower,transformer}.py``): a timm ViT-B/16 trunk
  at 448 px (``trunk.forward = trunk.forward_features``: final norm applied, all tokens), an
  attentional pooler with one query over all tokens (``torch.nn.MultiheadAttention`` with
  ``kdim = vdim =`` the trunk width, query/key LayerNorms) and ``ln_contrast``: ``forward`` is
  ``CoCa.encode_image(x, proj_contrast=False, normalize=False)``, the README's embedding for
  linear probes and MIL (512-d). The contrastive projection ``proj_contrast`` and the caption
  pooler (``attn_pool_caption``, ``ln_caption``) are not part of it and are not built.
* ``conch_v15_visual`` — ``EncoderWithAttentionalPooler`` of TITAN's ``conch_v1_5.py`` (an iBOT
  ViT-L/16 whose ``pos_embed`` has the 14x14 grid of ``img_size=224`` and is interpolated at
  every forward, DINO-style: bicubic with ``scale_factor=(grid + 0.1) / 14``), then a
  multi-head attentional pooler with bias-free linear maps (768-d, 8 heads, 1 query) and
  ``ln_contrast``. 768-d output. The timm ViT used as trunk has the same modules and key
  names; only the position-embedding interpolation is the official one rather than timm's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import register


def layer_norm_of_param(norm: nn.LayerNorm, param: torch.Tensor) -> torch.Tensor:
    """``norm(param)`` computed functionally: a Parameter given to a module call trips module
    hooks that expect autograd history (``FlopCounterMode`` under ``inference_mode``)."""
    return F.layer_norm(param, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class MhaAttentionalPooler(nn.Module):
    """CONCH v1 ``AttentionalPooler``: learned queries attend over LayerNormed tokens through
    ``nn.MultiheadAttention`` (sequence-first, as the official module calls it)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, L, context_dim)`` -> ``(N, n_queries, d_model)``."""
        kv = self.ln_k(tokens).permute(1, 0, 2)
        q = layer_norm_of_param(self.ln_q, self.query).unsqueeze(1).repeat(1, tokens.shape[0], 1)
        return self.attn(q, kv, kv, need_weights=False)[0].permute(1, 0, 2)


class LinearAttentionalPooler(nn.Module):
    """CONCH v1.5 ``AttentionalPooler``: multi-head cross-attention of learned queries over
    LayerNormed tokens with bias-free ``to_q`` / ``to_kv`` / ``to_out`` maps and a max-shifted
    softmax, as TITAN's ``conch_v1_5.py`` computes it."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.scale = (d_model // n_head) ** -0.5
        inner = (d_model // n_head) * n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, d_model, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, L, context_dim)`` -> ``(N, n_queries, d_model)``."""
        b = tokens.shape[0]
        q = self.to_q(layer_norm_of_param(self.ln_q, self.query).unsqueeze(0).expand(b, -1, -1))
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (self._split_heads(t) for t in (q, k, v))
        sim = torch.einsum("... i d, ... j d -> ... i j", q * self.scale, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = torch.einsum("... i j, ... j d -> ... i d", attn, v)
        return self.to_out(out.permute(0, 2, 1, 3).reshape(b, out.shape[2], -1))


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, image_hw: tuple[int, int], patch_px: int) -> torch.Tensor:
    """TITAN/iBOT ``interpolate_pos_encoding``: the ``(1, 1 + n*n, C)`` table (CLS first) for an
    image of ``image_hw`` pixels. Unchanged for a square image with ``n*n`` patches; otherwise
    the patch part is resized bicubically with ``scale_factor = (grid + 0.1) / n`` (the factor,
    not the output size, sets the sampling positions, exactly as the official call does)."""
    h_px, w_px = image_hw
    grid_h, grid_w = h_px // patch_px, w_px // patch_px
    n = pos_embed.shape[1] - 1
    if grid_h * grid_w == n and h_px == w_px:
        return pos_embed
    side = int(math.sqrt(n))
    dim = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos, scale_factor=((grid_h + 0.1) / math.sqrt(n), (grid_w + 0.1) / math.sqrt(n)), mode="bicubic"
    )
    if tuple(patch_pos.shape[-2:]) != (grid_h, grid_w):
        raise ValueError(f"position-embedding grid {tuple(patch_pos.shape[-2:])} != patch grid {(grid_h, grid_w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1)


class ConchV1Visual(nn.Module):
    """``CoCa.visual`` of CONCH v1 up to ``ln_contrast`` (see the module docstring)."""

    def __init__(self, *, depth: int = 12, embed_dim: int = 768, num_heads: int = 12, img_size: int = 448) -> None:
        super().__init__()
        self.trunk = VisionTransformer(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            img_size=img_size,
            patch_size=16,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = MhaAttentionalPooler(d_model=512, context_dim=embed_dim, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(N, 3, 448, 448)`` -> ``(N, 512)``."""
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


class ConchV15Visual(nn.Module):
    """TITAN's CONCH v1.5 tile encoder (see the module docstring)."""

    def __init__(
        self,
        *,
        depth: int = 24,
        embed_dim: int = 1024,
        num_heads: int = 16,
        img_size: int = 224,
        init_values: float = 1e-6,
    ) -> None:
        super().__init__()
        self.trunk = VisionTransformer(
            img_size=img_size,
            patch_size=16,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            init_values=init_values,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = LinearAttentionalPooler(d_model=768, context_dim=embed_dim, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's normed tokens (CLS first), the official ``forward_features``."""
        t = self.trunk
        patches = t.patch_embed(x)  # NHWC (dynamic_img_size)
        b, gh, gw, c = patches.shape
        seq = torch.cat((t.cls_token.expand(b, -1, -1), patches.reshape(b, gh * gw, c)), dim=1)
        seq = seq + dino_interpolate_pos_embed(t.pos_embed, tuple(x.shape[-2:]), t.patch_embed.patch_size[0])
        return t.norm(t.blocks(t.norm_pre(seq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(N, 3, 448, 448)`` -> ``(N, 768)``."""
        return self.ln_contrast(self.attn_pool_contrast(self.tokens(x))[:, 0])


@register("conch_v1_visual")
def conch_v1_visual(**kwargs) -> ConchV1Visual:
    return ConchV1Visual(**kwargs)


@register("conch_v15_visual")
def conch_v15_visual(**kwargs) -> ConchV15Visual:
    return ConchV15Visual(**kwargs)
