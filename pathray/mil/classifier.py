"""A trained slide classifier: the ABMIL network with its classes, saved and loaded as one file.

Checkpoints are ``torch.save`` files holding plain data only (the architecture spec, the
class names and the state dict), loaded with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pathray.mil.bags import BagIndex, load_bag, load_tiles
from pathray.mil.model import AbmilSpec, GatedAbmil
from pathray.store import embedding_matrix


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class SlideClassifier:
    """An ABMIL network and the class each output stands for."""

    network: GatedAbmil
    classes: list[Any]

    def save(self, path: str | Path) -> None:
        state = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
        torch.save({"spec": self.network.spec.to_dict(), "classes": self.classes, "state": state}, path)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> SlideClassifier:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        network = GatedAbmil(AbmilSpec(**raw["spec"]))
        network.load_state_dict(raw["state"])
        return cls(network.to(pick_device(device)).eval(), list(raw["classes"]))

    def forward_bag(self, bag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities ``(n_classes,)`` and attention ``(n_tiles,)`` of one bag (eval mode)."""
        device = next(self.network.parameters()).device
        self.network.eval()
        with torch.no_grad():
            logits, attention = self.network(torch.from_numpy(bag).to(device))
        return torch.softmax(logits, dim=-1).cpu().numpy(), attention.cpu().numpy()


def predict_probs(classifiers: list[SlideClassifier], index: BagIndex, slide_ids: list[str]) -> np.ndarray:
    """``(len(slide_ids), n_classes)``: the mean of the classifiers' probabilities, one slide read at a time."""
    out = np.zeros((len(slide_ids), len(classifiers[0].classes)), dtype=np.float64)
    for i, slide_id in enumerate(slide_ids):
        bag = load_bag(index, slide_id)
        out[i] = np.mean([c.forward_bag(bag)[0] for c in classifiers], axis=0)
    return out


def attention_table(classifiers: list[SlideClassifier], index: BagIndex, slide_id: str) -> pa.Table:
    """One slide's tiles (tile_index, x, y, size_level0: level-0 px) with ``attention``,
    averaged over ``classifiers``; attention sums to 1 over the slide."""
    tiles = load_tiles(index, slide_id, ["tile_index", "x", "y", "size_level0", "embedding"])
    attention = np.mean([c.forward_bag(embedding_matrix(tiles))[1] for c in classifiers], axis=0)
    return tiles.drop_columns(["embedding"]).append_column("attention", pa.array(attention.astype(np.float64)))
