"""CHIEF slide encoder (hms-dbmi/CHIEF, ``models/CHIEF.py``): gated attention-MIL over CTransPath tiles.

**Slide embedding.** The official WSI-level feature (``Get_CHIEF_WSI_level_feature.py``:
``model(x, torch.tensor([site]))["WSI_feature"]``, shape ``[1, 768]``) is
``softmax(A) @ x``: the attention-weighted mean of the *input* 768-d CTransPath tile
embeddings, attention ``A`` computed by ``attention_net`` (Linear 768 -> 512 + ReLU, then gated
attention 512 -> 256 -> 1). The anatomical-site index the official forward also takes only
enters ``WSI_feature_anatomical`` and the logits, never ``WSI_feature``, so pathray takes
none (TRIDENT's CHIEF wrapper passes site 0; any site gives the same vector).

**Tiles.** CTransPath-CHIEF tile embeddings (store model ``ctranspath``) of 256 x 256-px tiles at
10x (about 1 µm/px), as CHIEF's README and TRIDENT (``--patch_size 256 --mag 10``) extract them.

**Weights.** ``CHIEF_pretraining.pth`` (a plain state dict of ``CHIEF(size_arg="small",
dropout=True, n_classes=2)``), distributed on Google Drive, not the HF hub: pass its path. It is
loaded strictly like the official ``load_state_dict(td, strict=True)``, heads the slide
embedding does not use included (bag and instance classifiers, ``att_head``,
``text_to_vision``, the 19 x 768 ``organ_embedding`` text table).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .abmil import GatedAttention, attention_pool
from .release import Release, TileSetEncoder, random_net, resolve_weights

#: memory model of one slide (pathray.slide_level.encoders.memory.admit): twice the measured working
#: memory per tile (docs/bench/slide_encoders_abmil.md: 4.9 MB per 1,000 tiles on CPU fp32) plus
#: the tile embeddings themselves (768 float32), over a fixed allowance
BYTES_PER_TILE = 16 * 1024
FIXED_BYTES = 512 * 1024**2

RELEASE = Release(
    architecture="chief_small_gated_abmil",
    filename="CHIEF_pretraining.pth",
    hub_repo=None,
    obtain="download CHIEF_pretraining.pth from the CHIEF model_weight folder linked in github.com/hms-dbmi/CHIEF "
    "(Google Drive)",
    gated=False,
)
#: (input, hidden, attention) widths of the official ``size_arg="small"``
SIZES = (768, 512, 256)
N_ORGANS = 19  # rows of the official anatomical-site text table
TEXT_DIM = 768
PROVENANCE: dict[str, Any] = {
    "implementation": "pathray.slide_level.encoders.chief (plain PyTorch, fp32)",
    "output": "official WSI_feature: softmax(gated attention) @ input CTransPath embeddings (768-d)",
    "tile_model": "ctranspath (CTransPath-CHIEF), 256-px tiles at 10x (~1 µm/px)",
    "anatomical_site": "not used: it does not enter WSI_feature",
}


class ChiefNet(nn.Module):
    """``CHIEF(size_arg="small", dropout=True, n_classes=2)`` with the official parameter names;
    ``forward`` returns the official ``WSI_feature``."""

    def __init__(self) -> None:
        super().__init__()
        in_dim, hidden, attn = SIZES
        self.in_dim = in_dim
        # official: [Linear, ReLU, Dropout, Attn_Net_Gated] -> indices 0 and 3 hold parameters
        self.attention_net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Identity(), GatedAttention(hidden, attn)
        )
        self.classifiers = nn.Linear(hidden, 2)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(2)])
        self.att_head = nn.Module()
        self.att_head.fc1 = nn.Linear(hidden, attn)
        self.att_head.fc2 = nn.Linear(attn, 1)
        self.text_to_vision = nn.Sequential(nn.Linear(TEXT_DIM, hidden))
        self.register_buffer("organ_embedding", torch.zeros(N_ORGANS, TEXT_DIM))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N, 768)`` -> ``(768,)``: the official ``WSI_feature`` (``torch.mm(A, h_ori)``)."""
        logits = self.attention_net(tiles)
        return attention_pool(logits, tiles)


def from_weights(source: str | os.PathLike | None, device: str = "cpu") -> TileSetEncoder:
    """The CHIEF slide encoder with ``source`` = ``CHIEF_pretraining.pth`` or a directory holding
    it (``None`` raises ``WeightsUnavailableError`` saying where to get it)."""
    return TileSetEncoder.load(ChiefNet, RELEASE, resolve_weights(RELEASE, source), device, PROVENANCE)


def write_random_weights(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Random weights of the exact architecture (:func:`~pathray.slide_level.encoders.release.random_net`)
    saved as the release is: a plain state dict in ``<directory>/CHIEF_pretraining.pth``."""
    path = Path(directory) / RELEASE.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in random_net(ChiefNet, seed).state_dict().items()}, path)
    return path


def aggregator(weights: str | None, device: str) -> Any:
    """``AGGREGATORS["chief"]`` builder."""
    from pathray.slide_level.aggregators import SlideEncoderAggregator

    return SlideEncoderAggregator(from_weights(weights, device), (BYTES_PER_TILE, FIXED_BYTES, device))
