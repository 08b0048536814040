"""MADELEINE slide encoder (mahmoodlab/MADELEINE, ``madeleine/models/Model.py``): multi-head
gated attention-MIL over CONCH v1 tile embeddings.

**Slide embedding.** The official ``MADELEINE.encode_he`` (what TRIDENT and
``bin/extract_slide_embeddings.py`` call), ``(512,)``:

1. ``wsi_embedders.pre_attn``: three blocks Linear -> LayerNorm -> GELU (-> Dropout), widths
   512 -> 512 -> 512 -> 512 * 4, giving each tile 2048 features;
2. split into 4 heads by ``rearrange('b t (e c) -> b t e c', c=4)``: head ``c`` takes features
   ``c, c + 4, c + 8, ...`` (interleaved, not contiguous blocks);
3. per head, gated attention (``BatchedABMIL``: 512 -> 512 -> 1, softmax over tiles) pools
   its 512 features;
4. the ``(512, 4)`` pooled matrix is flattened row-major (feature-major, head-minor) and
   projected by ``projector`` (Linear 2048 -> 512).

``token_projector`` (the pretraining's local loss) is part of the checkpoint and unused here,
as in the official ``encode_he``.

**Tiles.** CONCH v1 tile embeddings (store model ``conch-v1``, 512-d, the projection head
output), 256 x 256-px tiles at 10x (about 1 µm/px): the MADELEINE README ("CONCH features at 10x
magnification on 256x256-pixel patches") and TRIDENT (``--patch_size 256 --mag 10``).

**Weights.** ``model.pt`` of the gated HF repo ``MahmoodLab/madeleine`` (a state dict, keys
prefixed ``module.`` by DDP, which the official ``create_model`` strips), built with
``stain_encoding=False`` from its ``model_config.json``; when a ``model_config.json`` lies next
to the weights, its architecture fields must be the released ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .abmil import GatedAttention, attention_pool
from .release import Release, TileSetEncoder, check_config, random_net, resolve_weights

#: memory model of one slide (pathray.slide_level.encoders.memory.admit): twice the measured working
#: memory per tile (docs/bench/slide_encoders_abmil.md: 15.7 MB per 1,000 tiles on CPU fp32) plus
#: the tile embeddings themselves (512 float32), over a fixed allowance
BYTES_PER_TILE = 40 * 1024
FIXED_BYTES = 512 * 1024**2

RELEASE = Release(
    architecture="madeleine_abmil_4heads_conch_v1",
    filename="model.pt",
    hub_repo="MahmoodLab/madeleine",
    obtain="request access at https://huggingface.co/MahmoodLab/madeleine and download model.pt (+ model_config.json)",
)
IN_DIM = 512  # CONCH v1 embedding width (config patch_embedding_dim)
HIDDEN_DIM = 512  # config wsi_encoder_hidden_dim; also BatchedABMIL's hidden_dim
N_HEADS = 4
#: model_config.json fields that fix the architecture, with the released values
CONFIG = {
    "wsi_encoder": "abmil",
    "patch_embedding_dim": IN_DIM,
    "wsi_encoder_hidden_dim": HIDDEN_DIM,
    "n_heads": N_HEADS,
    "activation": "softmax",
}
PROVENANCE: dict[str, Any] = {
    "implementation": "pathray.slide_level.encoders.madeleine (plain PyTorch, fp32; the official run autocasts to "
    "model_config.json's precision on CUDA)",
    "output": "official encode_he: projector(4 gated-attention heads over pre_attn features) (512-d)",
    "tile_model": "conch-v1 (512-d), 256-px tiles at 10x (~1 µm/px)",
}


def _block(in_dim: int, out_dim: int) -> list[nn.Module]:
    """Linear -> LayerNorm -> GELU -> Dropout (identity at inference: kept for the index names)."""
    return [nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(), nn.Identity()]


class MadeleineNet(nn.Module):
    """``MADELEINE(config, stain_encoding=False)`` with the official parameter names
    (``wsi_embedders.pre_attn``, ``wsi_embedders.attn.<head>``, ``projector``, ``token_projector``)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_dim = IN_DIM
        self.wsi_embedders = nn.Module()
        self.wsi_embedders.pre_attn = nn.Sequential(
            *_block(IN_DIM, HIDDEN_DIM), *_block(HIDDEN_DIM, HIDDEN_DIM), *_block(HIDDEN_DIM, HIDDEN_DIM * N_HEADS)
        )
        self.wsi_embedders.attn = nn.ModuleList([GatedAttention(HIDDEN_DIM, 512) for _ in range(N_HEADS)])
        self.projector = nn.Linear(HIDDEN_DIM * N_HEADS, HIDDEN_DIM)
        self.token_projector = nn.Linear(HIDDEN_DIM * N_HEADS, 128)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N, 512)`` -> ``(512,)``: the official ``encode_he`` of one slide."""
        h = rearrange(self.wsi_embedders.pre_attn(tiles), "t (e c) -> t e c", c=N_HEADS)
        pooled = torch.stack(
            [attention_pool(attn(h[:, :, c]), h[:, :, c]) for c, attn in enumerate(self.wsi_embedders.attn)], dim=-1
        )  # (512, heads)
        return self.projector(pooled.reshape(-1))


def from_weights(source: str | os.PathLike | None, device: str = "cpu") -> TileSetEncoder:
    """The MADELEINE slide encoder with ``source``: ``None`` (``model.pt`` of the hub repo),
    ``hf-hub:org/name[@rev]``, a ``model.pt`` file or a directory holding one."""
    resolved = resolve_weights(RELEASE, source)
    check_config(resolved[0], "model_config.json", CONFIG)
    return TileSetEncoder.load(MadeleineNet, RELEASE, resolved, device, PROVENANCE)


def write_random_weights(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Random weights of the exact architecture saved as the release is laid out:
    ``model.pt`` (state dict, ``module.``-prefixed keys) and ``model_config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"module.{k}": v.contiguous() for k, v in random_net(MadeleineNet, seed).state_dict().items()}
    torch.save(state, directory / RELEASE.filename)
    (directory / "model_config.json").write_text(json.dumps({**CONFIG, "MODALITIES": ["HE"], "precision": "float32"}))
    return directory / RELEASE.filename


def aggregator(weights: str | None, device: str) -> Any:
    """``AGGREGATORS["madeleine"]`` builder."""
    from pathray.slide_level.aggregators import SlideEncoderAggregator

    return SlideEncoderAggregator(from_weights(weights, device), (BYTES_PER_TILE, FIXED_BYTES, device))
