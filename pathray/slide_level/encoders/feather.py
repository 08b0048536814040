"""FEATHER slide encoder (mahmoodlab/MIL-Lab, ``src/models/abmil.py``): the gated ABMIL pretrained
on the PC-108 pan-cancer task, ``abmil.base.conch_v15.pc108-24k`` (FEATHER-24K, CONCH v1.5).

**Slide embedding.** The official ``ABMIL.forward_features`` (what TRIDENT's ``feather`` calls),
``(512,)``: ``patch_embed`` (Linear 768 -> 512 + ReLU; ``num_fc_layers=1``), gated attention
``global_attn`` (512 -> 384 -> 1), softmax over the tiles, attention-weighted sum of the
embedded tiles. The PC-108 classifier is not part of the slide embedding; the official loader
drops ``model.classifier.*`` (``load_pretrained(keep_classifier=False)``) and the README says the
released models carry none, so such entries are ignored when present.

**Tiles.** CONCH v1.5 tile embeddings (store model ``conch-v1.5``, 768-d), 512 x 512-px tiles at
20x (about 0.5 µm/px): TRIDENT's ``--slide_encoder feather --patch_size 512 --mag 20``.

**Weights.** ``model.safetensors`` of the gated HF repo
``MahmoodLab/abmil.base.conch_v15.pc108-24k`` (``ABMILModel.save_pretrained``: keys prefixed
``model.``), with its ``config.json``; its architecture fields, when present, must be the
``abmil/base.yaml`` ones with ``in_dim`` 768.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .abmil import GatedAttention, attention_pool
from .release import Release, TileSetEncoder, check_config, random_net, resolve_weights

#: memory model of one slide (pathray.slide_level.encoders.memory.admit): twice the measured working
#: memory per tile (docs/bench/slide_encoders_abmil.md: 6.4 MB per 1,000 tiles on CPU fp32) plus
#: the tile embeddings themselves (768 float32), over a fixed allowance
BYTES_PER_TILE = 16 * 1024
FIXED_BYTES = 512 * 1024**2

RELEASE = Release(
    architecture="feather_abmil_base_conch_v15",
    filename="model.safetensors",
    hub_repo="MahmoodLab/abmil.base.conch_v15.pc108-24k",
    obtain="request access at https://huggingface.co/MahmoodLab/abmil.base.conch_v15.pc108-24k and download "
    "model.safetensors (+ config.json)",
    key_prefix="model.",
    ignored_prefixes=("model.classifier.",),
)
#: ``src/model_configs/abmil/base.yaml`` with ``in_dim`` = CONCH v1.5's width
CONFIG = {"in_dim": 768, "embed_dim": 512, "attn_dim": 384, "num_fc_layers": 1, "gate": True}
PROVENANCE: dict[str, Any] = {
    "implementation": "pathray.slide_level.encoders.feather (plain PyTorch, fp32, as TRIDENT runs it)",
    "output": "official ABMIL.forward_features: gated-attention pooling of ReLU(Linear(768 -> 512)) tiles (512-d)",
    "tile_model": "conch-v1.5 (768-d), 512-px tiles at 20x (~0.5 µm/px)",
}


class FeatherNet(nn.Module):
    """``ABMIL(**base.yaml, in_dim=768)`` without its classifier, parameter names as in
    ``ABMILModel.model`` (``patch_embed.0``, ``global_attn.attention_{a,b,c}``)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_dim = CONFIG["in_dim"]
        self.patch_embed = nn.Sequential(nn.Linear(self.in_dim, CONFIG["embed_dim"]), nn.ReLU())
        self.global_attn = GatedAttention(CONFIG["embed_dim"], CONFIG["attn_dim"])

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N, 768)`` -> ``(512,)``: the official ``forward_features`` of one slide."""
        h = self.patch_embed(tiles)
        return attention_pool(self.global_attn(h), h)


def from_weights(source: str | os.PathLike | None, device: str = "cpu") -> TileSetEncoder:
    """The FEATHER slide encoder with ``source``: ``None`` (the hub repo's ``model.safetensors``),
    ``hf-hub:org/name[@rev]``, a ``model.safetensors`` file or a directory holding one."""
    resolved = resolve_weights(RELEASE, source)
    check_config(resolved[0], "config.json", CONFIG)
    return TileSetEncoder.load(FeatherNet, RELEASE, resolved, device, PROVENANCE)


def write_random_weights(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Random weights of the exact architecture in the release layout: ``model.safetensors``
    (``model.``-prefixed keys, no classifier) and a ``config.json`` (``num_classes`` 0)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.contiguous() for k, v in random_net(FeatherNet, seed).state_dict().items()}
    save_file(state, str(directory / RELEASE.filename))
    (directory / "config.json").write_text(
        json.dumps({**CONFIG, "dropout": 0.25, "num_classes": 0, "model_type": "abmil"})
    )
    return directory / RELEASE.filename


def aggregator(weights: str | None, device: str) -> Any:
    """``AGGREGATORS["feather"]`` builder."""
    from pathray.slide_level.aggregators import SlideEncoderAggregator

    return SlideEncoderAggregator(from_weights(weights, device), (BYTES_PER_TILE, FIXED_BYTES, device))
