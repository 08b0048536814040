"""Gated-attention MIL (Ilse, Tomczak & Welling 2018, "Attention-based Deep Multiple
Instance Learning", eq. 9) over a bag of tile embeddings.

``h_k = ReLU(W_in x_k)``; ``a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )``;
slide representation ``z = sum_k a_k h_k``; logits ``W_out z``. The attention ``a`` sums
to one over the bag's tiles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AbmilSpec:
    """Architecture: ``in_dim`` (embedding size), ``n_classes``, layer widths, dropout."""

    in_dim: int
    n_classes: int
    hidden_dim: int = 128
    attention_dim: int = 64
    dropout: float = 0.25

    def to_dict(self) -> dict:
        return asdict(self)


class GatedAbmil(nn.Module):
    """``forward(bag (N, in_dim)) -> (logits (n_classes,), attention (N,))``."""

    def __init__(self, spec: AbmilSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Sequential(nn.Linear(spec.in_dim, spec.hidden_dim), nn.ReLU(), nn.Dropout(spec.dropout))
        self.attention_v = nn.Linear(spec.hidden_dim, spec.attention_dim)
        self.attention_u = nn.Linear(spec.hidden_dim, spec.attention_dim)
        self.attention_w = nn.Linear(spec.attention_dim, 1)
        self.classifier = nn.Linear(spec.hidden_dim, spec.n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(bag)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)
        return self.classifier(attention @ h), attention
