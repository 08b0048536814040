"""Gated attention pooling (Ilse et al. 2018, as CLAM writes it), the block CHIEF, MADELEINE and
FEATHER pool tiles with, under the parameter names their releases share:
``attention_a.0`` (Linear + tanh), ``attention_b.0`` (Linear + sigmoid), ``attention_c`` (Linear
to one score). Dropout layers of the official modules are identity at inference and hold no
parameters, so they are left out.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedAttention(nn.Module):
    """``(N, dim)`` tile features -> ``(N,)`` attention logits ``c(tanh(a h) * sigmoid(b h))``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden_dim), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden_dim), nn.Sigmoid())
        self.attention_c = nn.Linear(hidden_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)


def attention_pool(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``softmax(logits over the N tiles) @ values``: ``(N,)``, ``(N, D)`` -> ``(D,)``."""
    return torch.softmax(logits, dim=0) @ values
