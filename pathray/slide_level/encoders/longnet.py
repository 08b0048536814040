"""LongNet encoder of the Prov-GigaPath slide encoder, in plain PyTorch (inference only).

Reproduces torchscale's ``LongNetEncoder`` as the official Prov-GigaPath code builds it
(``gigapath/torchscale``: pre-norm layers with sub-LayerNorms, GELU FFN, dilated attention),
without flash-attn or xformers. Module and parameter names follow the official model so
that its ``slide_encoder.pth`` loads strictly.

Dilated attention, as the official ``DilatedAttention`` computes it, for each branch
``(segment_length w, dilation r)``:

1. the sequence is zero-padded to a multiple of ``min(w, L)`` and cut into segments;
   each segment is zero-padded to a multiple of ``r``;
2. the heads are split into ``r`` groups; group ``j`` attends, within its segment, among the
   positions ``j, j + r, j + 2r, ...`` (dense softmax attention, scale ``head_dim ** -0.5``).
   Zero padding is *not* masked: padded keys take part in the softmax with score 0 and
   value 0, exactly as the unmasked fused kernel sees them;
3. each branch returns, per (position, head), its output and the log-sum-exp of its
   scores; positions a head group does not cover get output 0 and log-sum-exp ``-1e8``
   (the official code also maps a log-sum-exp of exactly 0 to ``-1e8``);
4. the padded per-segment layout is flattened and cut to ``L``, and the branches are
   merged with weights ``exp(lse_b - max_b lse) / sum_b exp(lse_b - max_b lse)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: score-matrix elements computed at once by :func:`attend` (bounds memory, ~128 MiB fp32)
ATTENTION_CHUNK_ELEMENTS = 32 * 2**20
#: log-sum-exp given to positions a head group does not attend from (official value)
NO_LSE = -1e8


def segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256) -> tuple[int, ...]:
    """Segment lengths the official ``LongNetViT.get_optimal_segment_length`` derives:
    five powers of two from 1024 to ``(max_wsi_size // tile_size) ** 2``, log-spaced and
    truncated to int. For the defaults: (1024, 5792, 32768, 185363, 1048576)."""
    max_seq_len = (max_wsi_size // tile_size) ** 2
    exponents = np.linspace(np.log2(1024), int(np.log2(max_seq_len)), 5)
    return tuple(int(v) for v in np.power(2, exponents).astype(int))


@dataclass(frozen=True)
class LongNetConfig:
    """Shape of the LongNet encoder (``LongNet_12_layers_768_dim`` of the official config)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 16
    ffn_dim: int = 3072
    segment_lengths: tuple[int, ...] = segment_lengths()
    dilated_ratios: tuple[int, ...] = (1, 2, 4, 8, 16)
    layernorm_eps: float = 1e-5  # torchscale's LayerNorms

    def __post_init__(self) -> None:
        if len(self.segment_lengths) != len(self.dilated_ratios):
            raise ValueError("one dilation ratio per segment length")
        if any(self.num_heads % r for r in self.dilated_ratios):
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of every dilation ratio")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the whole key axis, no mask: ``q, k, v`` are ``(B, L, d)``;
    returns ``(out (B, L, d), lse (B, L))`` with ``lse = logsumexp(q k^T / sqrt(d))``.
    Computed in chunks of rows; each row sees every key, so chunking changes nothing."""
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=q.dtype, device=q.device)
    rows = max(1, ATTENTION_CHUNK_ELEMENTS // max(1, k.shape[1]))
    batch_step = max(1, rows // max(1, q.shape[1]))
    for b0 in range(0, q.shape[0], batch_step):
        b1 = min(b0 + batch_step, q.shape[0])
        for r0 in range(0, q.shape[1], rows):
            r1 = min(r0 + rows, q.shape[1])
            scores = torch.matmul(q[b0:b1, r0:r1], k[b0:b1].transpose(1, 2)) * scale
            row_lse = torch.logsumexp(scores, dim=-1)
            out[b0:b1, r0:r1] = torch.matmul(torch.exp(scores - row_lse[..., None]), v[b0:b1])
            lse[b0:b1, r0:r1] = row_lse
    return out, lse


def _segments(x: torch.Tensor, seg: int, ratio: int) -> torch.Tensor:
    """``(B, L, H, d)`` -> ``(B * n, ceil(seg / ratio), H, d)``: zero-pad to ``n`` segments of
    ``seg``, zero-pad each segment to a multiple of ``ratio``, and give head group ``j`` (of
    ``ratio`` groups) the positions ``j, j + ratio, ...`` of its segment."""
    _, length, h, d = x.shape
    x = F.pad(x, (0, 0, 0, 0, 0, -length % seg))
    x = x.reshape(-1, seg, h, d)
    x = F.pad(x, (0, 0, 0, 0, 0, -seg % ratio))
    m = x.shape[1] // ratio
    x = x.reshape(x.shape[0], m, ratio, ratio, h // ratio, d)  # (., l, position offset, head group, h', d)
    x = torch.diagonal(x, dim1=2, dim2=3)  # (., l, h', d, group)
    return x.permute(0, 1, 4, 2, 3).reshape(x.shape[0], m, h, d)


def _unsegment(out: torch.Tensor, lse: torch.Tensor, ratio: int, batch: int, length: int) -> tuple[torch.Tensor, ...]:
    """Inverse layout of :func:`_segments`: ``out (B*n, m, H, d)``, ``lse (B*n, m, H)`` ->
    ``(B, length, H, d)``, ``(B, length, H)``; uncovered (position, head) pairs get output 0
    and log-sum-exp :data:`NO_LSE`. The padded per-segment layout is flattened before the
    cut to ``length``, as in the official code."""
    h, d = out.shape[2:]
    group_of_head = torch.arange(h, device=out.device) // (h // ratio)
    covers = group_of_head[None, :] == torch.arange(ratio, device=out.device)[:, None]  # (offset, head)
    dense = out[:, :, None] * covers[None, None, :, :, None]  # (bn, m, offset, h, d)
    dense_lse = torch.where(covers[None, None], lse[:, :, None], torch.full_like(lse[:, :, None], NO_LSE))
    dense_lse = dense_lse.masked_fill(dense_lse == 0, NO_LSE)
    dense = dense.reshape(batch, -1, h, d)[:, :length]
    return dense, dense_lse.reshape(batch, -1, h)[:, :length]


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: LongNetConfig) -> torch.Tensor:
    """Dilated attention of ``(B, L, H, d)`` queries/keys/values (module docstring); ``(B, L, H, d)``."""
    b, length, h, d = q.shape
    outs, lses = [], []
    for seg, ratio in zip(config.segment_lengths, config.dilated_ratios):
        seg = min(seg, length)
        qs, ks, vs = (_segments(t, seg, ratio) for t in (q, k, v))
        m = qs.shape[1]
        flat = [t.permute(0, 2, 1, 3).reshape(-1, m, d) for t in (qs, ks, vs)]
        out, lse = attend(*flat)
        out = out.reshape(-1, h, m, d).permute(0, 2, 1, 3)
        lse = lse.reshape(-1, h, m).permute(0, 2, 1)
        o, s = _unsegment(out, lse, ratio, b, length)
        outs.append(o)
        lses.append(s)
    max_lse = torch.stack(lses).max(0)[0]
    weights = [torch.exp(s - max_lse) for s in lses]
    total = torch.stack(weights).sum(0)
    merged = torch.zeros_like(outs[0])
    for o, w in zip(outs, weights):
        merged += o * (w / total)[..., None]
    return merged


class DilatedSelfAttention(nn.Module):
    """torchscale ``DilatedAttention`` (self-attention, sub-LayerNorm before ``out_proj``)."""

    def __init__(self, config: LongNetConfig):
        super().__init__()
        dim = config.embed_dim
        self.config = config
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=config.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        h = self.config.num_heads
        q, k, v = (proj(x).reshape(b, length, h, dim // h) for proj in (self.q_proj, self.k_proj, self.v_proj))
        attn = dilated_attention(q, k, v, self.config).reshape(b, length, dim)
        return self.out_proj(self.inner_attn_ln(attn))


class FeedForward(nn.Module):
    """torchscale ``FeedForwardNetwork`` with sub-LayerNorm: fc1 -> GELU -> LayerNorm -> fc2."""

    def __init__(self, config: LongNetConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(config.ffn_dim, eps=config.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x).float()).type_as(x)))


class EncoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + ffn(LN(x))``."""

    def __init__(self, config: LongNetConfig):
        super().__init__()
        self.self_attn = DilatedSelfAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps)
        self.ffn = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class LongNetEncoder(nn.Module):
    """The layer stack and its output LayerNorm (``encoder.*`` keys of ``slide_encoder.pth``)."""

    def __init__(self, config: LongNetConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.depth))
        self.layer_norm = nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(layer_norm(last hidden state), [input, output of each layer])``: the official
        ``encoder_out`` and ``encoder_states`` (the latter without the output LayerNorm)."""
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return self.layer_norm(x), states
