"""Meta's DINOv2 vision transformer (``facebookresearch/dinov2``, ``dinov2/models/vision_transformer.py``),
written for pathray with the official parameter names, so a checkpoint saved from the official
``DinoVisionTransformer`` (``block_chunks=0``) loads strictly.

What is reproduced (inference only): patch embedding, class token, absolute position embedding
resampled as the official ``interpolate_pos_encoding`` does (bicubic; ``interpolate_offset`` > 0:
by scale factor ``(grid + offset) / M``, else by output size; ``interpolate_antialias``), register
tokens inserted after the class token *after* the position embedding, pre-norm blocks with
LayerScale, an ``mlp`` (GELU) or ``swiglufused`` (SwiGLU, hidden width rounded as
``SwiGLUFFNFused``) feed-forward, the final LayerNorm (eps 1e-6). ``forward`` returns the
normalised class token (the official ``model(x)`` with ``head = Identity``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import register

_LN_EPS = 1e-6


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in torch.unbind(qkv, 2))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    """``ffn_layer="mlp"``: fc1 -> GELU (exact) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    """``ffn_layer="swiglufused"``: ``w12`` packs both halves; hidden = round8(2/3 * mlp hidden)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ffn_layer: str, init_values: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        ffn = {"mlp": _Mlp, "swiglufused": _SwiGLU}[ffn_layer]
        self.mlp = ffn(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class DinoV2Config:
    """The official ``DinoVisionTransformer`` constructor's hyper-parameters used here."""

    img_size: int  # fixes the position-embedding grid: img_size // patch_size per side
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"  # mlp | swiglufused
    num_register_tokens: int = 0
    init_values: float = 1.0  # LayerScale
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1


class DinoV2ViT(nn.Module):
    """DINOv2 ``DinoVisionTransformer`` (``block_chunks=0``, LayerScale on, all biases on).

    ``img_size`` fixes the position-embedding grid (``img_size // patch_size`` per side), as in
    the official constructor; other input sizes are resampled on the fly like the official code.
    """

    def __init__(self, config: DinoV2Config) -> None:
        super().__init__()
        if config.ffn_layer not in ("mlp", "swiglufused"):
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglufused', got {config.ffn_layer!r}")
        embed_dim = config.embed_dim
        self.patch_size = config.patch_size
        self.embed_dim = self.num_features = embed_dim
        self.interpolate_antialias = config.interpolate_antialias
        self.interpolate_offset = config.interpolate_offset
        grid = config.img_size // config.patch_size
        self.patch_embed = _PatchEmbed(config.patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        registers = config.num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, embed_dim)) if registers else None
        self.blocks = nn.ModuleList(
            [
                _Block(embed_dim, config.num_heads, config.mlp_ratio, config.ffn_layer, config.init_values)
                for _ in range(config.depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # training only; part of the checkpoint
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)

    def interpolate_pos_encoding(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The position embedding for ``tokens`` (CLS + patches) of a ``height`` x ``width`` px input
        (official algorithm; the official code names the NCHW dims ``w, h``: here rows, cols)."""
        n_patches = tokens.shape[1] - 1
        n_grid = self.pos_embed.shape[1] - 1
        if n_patches == n_grid and height == width:
            return self.pos_embed
        pos = self.pos_embed.float()
        dim = pos.shape[-1]
        rows, cols = height // self.patch_size, width // self.patch_size
        m = int(math.sqrt(n_grid))
        if self.interpolate_offset:
            size_kw = {
                "scale_factor": (float(rows + self.interpolate_offset) / m, float(cols + self.interpolate_offset) / m)
            }
        else:
            size_kw = {"size": (rows, cols)}
        patch_pos = F.interpolate(
            pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **size_kw,
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((pos[:, :1], patch_pos), dim=1).to(tokens.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: ``[CLS, registers..., patches...]``."""
        _, _, height, width = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, height, width)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


@register("dinov2_vit")
def dinov2_vit(**kwargs) -> DinoV2ViT:
    """``DinoV2ViT(DinoV2Config(**kwargs))``."""
    return DinoV2ViT(DinoV2Config(**kwargs))
