"""CTransPath (Wang et al., MedIA 2022): a Swin-T whose patch embedding is a convolutional
stem, in the parameter layout of the released ``ctranspath.pth`` / CHIEF's
``CHIEF_CTransPath.pth``.

The official code (``ctran.py`` of Xiyue-Wang/TransPath, identical in hms-dbmi/CHIEF) builds
``swin_tiny_patch4_window7_224`` of a modified timm 0.5.4 (whose only change is an
``embed_layer`` argument) with its ``ConvStem`` and replaces the head by ``nn.Identity``: the
embedding is the mean over the 7x7 final tokens after the last LayerNorm (768-d). This module
re-implements that network in plain PyTorch with timm 0.5.4's module names, buffers included
(``relative_position_index``, the shifted blocks' ``attn_mask``), so the release loads strictly:
patch merging sits at the *end* of stages 0-2 (``layers.{i}.downsample``), as in timm 0.5.4.
The input size is fixed (224 px): the attention masks are built for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import register


class ConvStem(nn.Module):
    """Two stride-2 3x3 conv+BN+ReLU, a 1x1 conv to ``embed_dim``, LayerNorm over channels."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        mid = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(3, mid, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, 2 * mid, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * mid),
            nn.ReLU(),
            nn.Conv2d(2 * mid, embed_dim, kernel_size=1),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _windows(x: torch.Tensor, win: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, win * win, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, win * win, c)


def _unwindows(x: torch.Tensor, win: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_windows`: (B * nW, win * win, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.view(-1, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _relative_position_index(win: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (win - 1)
    return rel[:, :, 0] * (2 * win - 1) + rel[:, :, 1]


def _shift_mask(h: int, w: int, win: int, shift: int) -> torch.Tensor:
    """(nW, win*win, win*win) additive mask of a cyclically shifted window partition (-100 across regions)."""
    regions = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -win), slice(-win, -shift), slice(-shift, None))
    for i, hs in enumerate(cuts):
        for j, ws in enumerate(cuts):
            regions[:, hs, ws, :] = 3 * i + j
    ids = _windows(regions, win).squeeze(-1)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, win: int, heads: int) -> None:
        super().__init__()
        self.heads, self.win = heads, win
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(win))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(
                -1, self.heads, n, n
            )
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP block on a fixed ``res x res`` token grid."""

    def __init__(self, dim: int, res: int, heads: int, win: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        if res <= win:  # timm 0.5.4: a window covering the grid, never shifted
            win, shift = res, 0
        self.res, self.win, self.shift = res, win, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, win, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.register_buffer("attn_mask", _shift_mask(res, res, win, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        y = self.norm1(x).view(b, self.res, self.res, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = _unwindows(self.attn(_windows(y, self.win), self.attn_mask), self.win, self.res, self.res)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, self.res * self.res, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (order: (0,0), (1,0), (0,1), (1,1)), LayerNorm, linear 4C -> 2C."""

    def __init__(self, dim: int, res: int) -> None:
        super().__init__()
        self.res = res
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


@dataclass(frozen=True)
class CTransPathConfig:
    """The official constructor's hyper-parameters (defaults: the released Swin-T)."""

    img_size: int = 224
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    depth: int | None = None  # shrunk test models (``write_random_weights(..., depth=1)``): blocks per stage at most

    def stage_depths(self) -> list[int]:
        """Blocks of each stage, capped at ``depth`` when given."""
        return [d if self.depth is None else min(d, self.depth) for d in self.depths]


class Stage(nn.Module):
    """Stage ``index`` of the Swin: its blocks, then patch merging unless it is the last."""

    def __init__(self, config: CTransPathConfig, index: int) -> None:
        super().__init__()
        depths = config.stage_depths()
        dim, res = config.embed_dim * 2**index, config.img_size // 4 // 2**index
        heads, win = config.num_heads[index], config.window_size
        self.blocks = nn.ModuleList(
            SwinBlock(dim, res, heads, win, 0 if i % 2 == 0 else win // 2, config.mlp_ratio)
            for i in range(depths[index])
        )
        self.downsample = PatchMerging(dim, res) if index < len(depths) - 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class CTransPath(nn.Module):
    """Swin-T with a conv stem; ``forward`` returns the mean of the final normalised tokens."""

    def __init__(self, config: CTransPathConfig = CTransPathConfig()) -> None:
        super().__init__()
        self.img_size = config.img_size
        self.patch_embed = ConvStem(config.embed_dim)
        last = len(config.depths) - 1
        self.layers = nn.Sequential(*(Stage(config, i) for i in range(min(len(config.depths), len(config.num_heads)))))
        self.num_features = config.embed_dim * 2**last
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"CTransPath takes {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        return self.norm(self.layers(self.patch_embed(x))).mean(dim=1)


@register("ctranspath_swin_tiny")
def ctranspath_swin_tiny(**kwargs) -> CTransPath:
    """``CTransPath(CTransPathConfig(**kwargs))``."""
    return CTransPath(CTransPathConfig(**kwargs))
