"""GenBio-PathFM (Kapse et al., bioRxiv 2026): a DINOv3-style ViT run on each colour channel
separately, in the parameter layout of the released ``model.pth`` (``genbio-ai/genbio-pathfm``).

Official code: ``genbio_pathfm/model.py`` of genbio-ai/genbio-pathfm (``GenBio_PathFM_Inference``):
a single-channel ViT (patch 16, width 1536, 40 blocks, 24 heads, SwiGLU FFN of hidden width 4096
(ratio 4, 2/3, aligned to 64), LayerScale, qkv without bias, LayerNorm eps 1e-6, a [CLS] and 4
storage tokens, 2-D RoPE on the patch tokens, no absolute position embedding). The R, G and B
planes of the normalised image are encoded as three grey images and the three final-norm [CLS]
tokens are concatenated (4608-d). The RoPE tables and the rotation of q/k run in bfloat16, as
the official ``RopePositionEmbedding(dtype=bf16)`` does, so this module reproduces that rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import register

_ROPE_DTYPE = torch.bfloat16


class Rope(nn.Module):
    """2-D rotary tables (sin, cos) for an H x W grid; coordinates normalised per axis to [-1, 1]."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        exponents = 2 * torch.arange(head_dim // 4, dtype=_ROPE_DTYPE) / (head_dim // 2)
        self.register_buffer("periods", base**exponents)

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        dd = {"device": self.periods.device, "dtype": _ROPE_DTYPE}
        coords_h = torch.arange(0.5, h, **dd) / h
        coords_w = torch.arange(0.5, w, **dd) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods.to(_ROPE_DTYPE)[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).unbind(2))
        sin, cos = rope
        prefix = n - sin.shape[-2]
        q, k = (
            torch.cat((t16[:, :, :prefix], _rotate(t16[:, :, prefix:], sin, cos)), dim=-2).to(t.dtype)
            for t, t16 in ((q, q.to(sin.dtype)), (k, k.to(sin.dtype)))
        )
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass(frozen=True)
class GenBioPathFMConfig:
    """The official constructor's hyper-parameters (defaults: the release)."""

    patch_size: int = 16
    embed_dim: int = 1536
    depth: int = 40
    num_heads: int = 24
    ffn_ratio: float = 4.0
    n_storage_tokens: int = 4
    rope_base: float = 100.0


class GenBioPathFM(nn.Module):
    """``forward(x)``: (N, 3, H, W) -> (N, 3 * embed_dim), the per-channel [CLS] tokens in R, G, B order."""

    def __init__(self, config: GenBioPathFMConfig = GenBioPathFMConfig()) -> None:
        super().__init__()
        embed_dim = config.embed_dim
        d = int(embed_dim * config.ffn_ratio * 2 / 3)
        hidden = d + (-d % 64)  # official SwiGLUFFN "swiglu64"
        self.patch_embed = PatchEmbed(config.patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, config.n_storage_tokens, embed_dim))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        self.rope_embed = Rope(embed_dim // config.num_heads, config.rope_base)
        self.blocks = nn.ModuleList(Block(embed_dim, config.num_heads, hidden) for _ in range(config.depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        grid = self.patch_embed(x.reshape(b * c, 1, h, w))
        tokens = grid.flatten(2).transpose(1, 2)
        prefix = torch.cat([self.cls_token, self.storage_tokens], dim=1).expand(b * c, -1, -1)
        tokens = torch.cat([prefix, tokens], dim=1)
        rope = self.rope_embed(grid.shape[2], grid.shape[3])
        for block in self.blocks:
            tokens = block(tokens, rope)
        return self.norm(tokens)[:, 0].reshape(b, -1)


@register("genbio_pathfm_vit")
def genbio_pathfm_vit(**kwargs) -> GenBioPathFM:
    """``GenBioPathFM(GenBioPathFMConfig(**kwargs))``."""
    return GenBioPathFM(GenBioPathFMConfig(**kwargs))
