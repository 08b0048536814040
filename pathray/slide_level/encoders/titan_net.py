"""TITAN's slide network (MahmoodLab/TITAN ``vision_encoder``) with the official parameter names.

Architecture (official ``vision_transformer.py`` ``VisionTransformer`` as built by
``build_vision_tower`` from the release's ``vision_config``; ``modeling_titan.Titan``):

1. ``preprocess_features``: each tile's grid cell is ``floor_divide(coords - coords.min(0),
   patch_size_lv0)``; features of tiles sharing a cell are summed into a dense
   ``(W, H, 768)`` grid (``index_add_``), cells whose summed feature is all zeros are
   background and dropped; the foreground cells are taken in grid order ``gx * H + gy``;
2. a 768 -> 768 linear + GELU "patch" embedding, a learned CLS token in front, no position
   embedding: position enters as 2-D ALiBi, a per-head bias ``-slope_h * ||cell_i - cell_j||``
   (Euclidean, grid units) added to the attention scores between tiles, 0 for the CLS row
   and column; slopes of the official ``get_slopes(12)``;
3. 6 pre-norm ViT blocks (12 heads, MLP 3072, GELU, LayerNorm eps 1e-6), a final LayerNorm;
4. the slide embedding is ``encode_slide_from_patch_features`` = the contrastive attentional
   pooler (one learned query, 8-head ``nn.MultiheadAttention`` over all tokens, CLS included,
   after LayerNorms of query and tokens) *without* the final projection (``no_proj=True``):
   ``(768,)``. The 128-query pooler and ``proj`` are loaded but do not affect this output.

Memory: the official code materialises the ``(12, L, L)`` ALiBi bias (and its float64
distances), O(L^2) — ~5 GB per copy at 10k tiles. Here attention runs in query-row chunks with
the bias of each chunk computed on the fly (the same float operations: float64 distance ->
float32, times the float32 slope, negated), and the MLP in row chunks, so memory is linear in
the number of tiles; :meth:`pathray.slide_level.encoders.titan.TitanSlideEncoder.max_tiles` says how many fit, and a larger slide
raises :class:`~pathray.errors.SlideTooLargeForEncoderError` before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: bytes of float32 scores/bias per attention or MLP chunk (bounds the working memory)
CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TitanConfig:
    """Shape of the slide encoder (defaults: the released ``vision_config``)."""

    in_dim: int = 768  # mlp_patch_embed_dim: CONCH v1.5 features
    embed_dim: int = 768
    depth: int = 6
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pooler_queries: int = 128  # attn_pooler_queries
    pooler_heads: int = 8  # attn_pooler_heads
    norm_eps: float = 1e-6


#: the released ``vision_config``
RELEASED_CONFIG = TitanConfig()


def alibi_slopes(num_heads: int) -> list[float]:
    """The official ``get_slopes``: geometric slopes ``2^(-8/n) ** (i+1)`` for a power of two
    ``n``, else those of the nearest lower power of two plus every other slope of the next one."""
    if math.log2(num_heads).is_integer():
        p = 2 ** (-(2 ** -(math.log2(num_heads) - 3)))
        return [p * p**i for i in range(num_heads)]
    lower = 2 ** math.floor(math.log2(num_heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, points: torch.Tensor, slopes: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
        """``x (L, dim)`` (CLS first), ``points (L - 1, 2)`` float64 cells -> ``(L, dim)``: the
        official ``scaled_dot_product_attention(q, k, v, attn_mask=alibi)``, by query rows."""
        length, dim = x.shape
        qkv = self.qkv(x).reshape(length, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3).contiguous()
        q, k, v = qkv.unbind(0)  # (heads, L, head_dim) each, contiguous: no copy per chunk
        out = torch.empty_like(q)
        rows = max(1, chunk_bytes // (length * (12 * self.heads + 16)))  # bias, scores, distances
        for start in range(0, length, rows):
            stop = min(length, start + rows)
            bias = alibi_bias(points, start, stop, slopes)
            out[:, start:stop] = F.scaled_dot_product_attention(q[:, start:stop], k, v, attn_mask=bias)
        return self.proj(out.transpose(0, 1).reshape(length, dim))


def alibi_bias(points: torch.Tensor, start: int, stop: int, slopes: torch.Tensor) -> torch.Tensor:
    """Rows ``start:stop`` of the official ``get_alibi`` bias ``(heads, L, L)`` (token 0 = CLS,
    zero row and column): ``-(float32(||p_i - p_j||) * slope_h)``, distances in float64 first."""
    length = points.shape[0] + 1
    bias = torch.zeros(len(slopes), stop - start, length, dtype=torch.float32, device=points.device)
    first = max(start, 1)
    if first < stop:
        dists = (points[first - 1 : stop - 1, None, :] - points[None, :, :]).square_().sum(-1).sqrt_().float()
        rows = bias[:, first - start :, 1:]
        torch.mul(dists[None], slopes[:, None, None], out=rows)
        rows.neg_()  # the official "* -1"
    return bias


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, config: TitanConfig):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = _Attention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = _Mlp(dim, int(dim * config.mlp_ratio))

    def forward(self, x: torch.Tensor, points: torch.Tensor, slopes: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), points, slopes, chunk_bytes)
        rows = max(1, chunk_bytes // (4 * self.mlp.fc1.out_features * 2))
        for start in range(0, x.shape[0], rows):  # in place, row chunks: rows are independent
            part = x[start : start + rows]
            part += self.mlp(self.norm2(part))
        return x


class _Blocks(nn.Module):
    """The official ``CustomSequential`` (its parameters live under ``modules_list``)."""

    def __init__(self, config: TitanConfig):
        super().__init__()
        self.modules_list = nn.ModuleList(_Block(config) for _ in range(config.depth))


class AttentionalPooler(nn.Module):
    """The official CoCa ``AttentionalPooler`` for one slide (batch 1, no mask)."""

    def __init__(self, dim: int, heads: int, queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=dim, vdim=dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (L, dim)`` -> ``(queries, dim)``."""
        keys = self.ln_k(x)[:, None]
        out, _ = self.attn(self.ln_q(self.query)[:, None], keys, keys, need_weights=False)
        return out[:, 0]


class TitanSlideNet(nn.Module):
    """TITAN's ``vision_encoder`` with the official parameter names (``cls_token``,
    ``patch_embed.0``, ``blocks.modules_list.<i>``, ``norm``, ``attn_pool``,
    ``attn_pool_contrastive``, ``proj``)."""

    def __init__(self, config: TitanConfig = RELEASED_CONFIG):
        super().__init__()
        dim = config.embed_dim
        self.config = config
        self.patch_embed = nn.Sequential(nn.Linear(config.in_dim, dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = _Blocks(config)
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn_pool = AttentionalPooler(dim, config.pooler_heads, config.pooler_queries)
        self.attn_pool_contrastive = AttentionalPooler(dim, config.pooler_heads, 1)
        self.proj = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, features: torch.Tensor, cells: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
        """``features (N, in_dim)`` float32 and their grid ``cells (N, 2)`` int64 (>= 0) ->
        the slide embedding ``(dim,)`` (official ``encode_slide_from_patch_features``)."""
        tokens, points = foreground_tokens(features, cells)
        x = torch.cat([self.cls_token[0], self.patch_embed(tokens)])
        slopes = torch.tensor(alibi_slopes(self.config.num_heads), dtype=torch.float32, device=x.device)
        points = points.double()  # exact integers: float64 distances as the official numpy code
        for block in self.blocks.modules_list:
            x = block(x, points, slopes, chunk_bytes)
        return self.attn_pool_contrastive(self.norm(x))[0]


def foreground_tokens(features: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``preprocess_features`` + background selection, without the dense grid:
    features summed per cell, cells in grid order ``gx * H + gy``, all-zero cells dropped.
    Returns ``(tokens (M, C), points (M, 2) int64)``."""
    height = int(cells[:, 1].max()) + 1
    keys, inverse = torch.unique(cells[:, 0] * height + cells[:, 1], sorted=True, return_inverse=True)
    summed = torch.zeros(len(keys), features.shape[1], dtype=features.dtype, device=features.device)
    summed.index_add_(0, inverse, features)
    keep = (summed != 0).any(dim=1)
    keys = keys[keep]
    return summed[keep], torch.stack([keys // height, keys % height], dim=1)
