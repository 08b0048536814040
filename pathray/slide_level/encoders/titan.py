"""TITAN slide encoder (MahmoodLab/TITAN, vision part): CONCH v1.5 tile features + grid -> slide embedding.

The network and how it computes (architecture, memory): :mod:`pathray.slide_level.encoders.titan_net`.

**Coordinate rule.** TITAN takes CONCH v1.5 features of 512-px tiles at 0.5 µm/px (20x) and
``patch_size_lv0`` = the tile side in level-0 px; the official coordinates (TRIDENT/CLAM) lie on
the lattice ``i * patch_size_lv0``, so the official cell is the tile's column/row index minus
the smallest one. pathray's grid puts tile ``i`` at ``x = round(i * s)`` with
``s = 512 * 0.5 / slide_mpp`` level-0 px (not an integer in general: 973.1 at 0.2631 µm/px), so
:func:`titan_cells` recovers ``i = round(x / s)`` (exact: ``|x - i s| <= 0.5``) and uses
``i - min(i)``. A plain ``floor((x - x_min) / s)`` would put a tile one cell short whenever
rounding made its offset fall below a multiple of ``s`` (e.g. at 0.2631 µm/px). Coordinates
off that lattice (another tiling) are refused.

**Weights.** ``model.safetensors`` of ``MahmoodLab/TITAN`` (gated): the whole Titan model. Only
keys under ``vision_encoder.`` are read (safetensors lets the text part stay on disk); keys
under the declared text prefix ``text_encoder.`` are ignored; any other key, a missing key or a
wrong shape is refused (:class:`~pathray.errors.WeightsMismatchError`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathray.encoders.builders import from_release_layout
from pathray.encoders.checkpoint import load_into, read_state_dict
from pathray.errors import WeightsCorruptError
from pathray.slide_level.aggregators import TITAN_TILES

from .memory import admit, available_memory_bytes
from .release import Release, resolve_weights
from .titan_net import CHUNK_BYTES, RELEASED_CONFIG, TitanConfig, TitanSlideNet

ARCHITECTURE = "titan_vision_encoder"
HUB_REPO = "MahmoodLab/TITAN"
HUB_FILENAME = "model.safetensors"
#: the released file, for :func:`pathray.slide_level.encoders.release.resolve_weights`
RELEASE = Release(
    architecture=ARCHITECTURE,
    filename=HUB_FILENAME,
    hub_repo=HUB_REPO,
    obtain="request access at https://huggingface.co/MahmoodLab/TITAN, then `hf auth login` or HF_TOKEN",
)
#: key prefix of the slide encoder in the released checkpoint, and the declared other parts
CHECKPOINT_PREFIX = "vision_encoder."
CHECKPOINT_IGNORE = ("text_encoder.",)
COORDINATE_RULE = (
    "cell = (round(x_level0 / s) - min, round(y_level0 / s) - min), s = 512 * 0.5 / slide_mpp level-0 px "
    "(the official floor((coord - min coord) / patch_size_lv0) on the tile lattice)"
)
#: activation bytes per token (x, residual, LayerNorm output, q/k/v, attention output, pooler
#: keys and values, slack); validated against measured peaks by benchmarks/slide_encoders.py
BYTES_PER_TOKEN = 32 * 1024
#: the encoder's fixed working set besides the weights (chunk buffers, allocator slack)
FIXED_BYTES = 4 * CHUNK_BYTES


def titan_cells(x_level0: np.ndarray, y_level0: np.ndarray, slide_mpp: float) -> np.ndarray:
    """pathray level-0 tile top-lefts -> TITAN grid cells ``(N, 2)`` int64 (see the module's
    coordinate rule). ``ValueError`` for a bad ``slide_mpp`` or tiles off the 512-px lattice."""
    if not (slide_mpp > 0 and np.isfinite(slide_mpp)):
        raise ValueError(f"slide_mpp must be a positive number of µm/px, got {slide_mpp!r}")
    step = TITAN_TILES.tile_px * TITAN_TILES.target_mpp / slide_mpp
    xy = np.stack([np.asarray(x_level0, np.float64).ravel(), np.asarray(y_level0, np.float64).ravel()], 1)
    index = np.round(xy / step)
    off = np.abs(xy - index * step)
    if off.size and off.max() > 0.5 + 1e-6:
        raise ValueError(
            f"tile coordinates are not on TITAN's lattice of {TITAN_TILES.tile_px}-px tiles at {TITAN_TILES.target_mpp} "
            f"µm/px ({step:.3f} level-0 px at {slide_mpp} µm/px): off by up to {off.max():.1f} px"
        )
    cells = index.astype(np.int64)
    return cells - cells.min(axis=0) if len(cells) else cells


def official_cells(coords: np.ndarray, patch_size_lv0: int | float) -> np.ndarray:
    """The official rule as such: ``floor_divide(coords - coords.min(0), patch_size_lv0)``
    for TRIDENT/CLAM coordinates ``(N, 2)`` (level-0 px) and their ``patch_size_level0``."""
    coords = np.asarray(coords)
    rel = coords - coords.min(axis=0)
    return np.floor_divide(rel, patch_size_lv0).astype(np.int64)


class TitanSlideEncoder:
    """Slide embeddings from one slide's CONCH v1.5 tile features and level-0 coordinates."""

    def __init__(self, net: TitanSlideNet, device: str, source: str, fingerprint: str):
        self.net = net.to(device).eval()
        self.device = device
        self.source = source
        self.fingerprint = fingerprint

    @classmethod
    def from_weights(cls, source: str | os.PathLike | None, device: str = "cpu") -> TitanSlideEncoder:
        """``source``: ``None`` (``model.safetensors`` of ``MahmoodLab/TITAN``), ``hf-hub:org/name[@rev]``,
        a release-layout file (``.safetensors``, or a ``.pth``/``.bin`` state dict read with
        ``weights_only=True``) or a directory holding ``model.safetensors``. Raises
        ``WeightsUnavailableError``, ``WeightsCorruptError`` or ``WeightsMismatchError``."""
        path, label, fingerprint = resolve_weights(RELEASE, source)
        with torch.device("meta"):
            net = TitanSlideNet()
        load_into(net, read_vision_part(path), what=f"{ARCHITECTURE} weights {label}")
        return cls(net, device, label, fingerprint)

    def __call__(
        self, tile_embeddings: np.ndarray, x_level0: np.ndarray, y_level0: np.ndarray, slide_mpp: float
    ) -> np.ndarray:
        """``(N, 768)`` CONCH v1.5 features of pathray's 512-px tiles at 0.5 µm/px + their level-0
        top-lefts + the slide's µm/px -> ``(768,)`` float32 slide embedding."""
        return self.embed_cells(tile_embeddings, titan_cells(x_level0, y_level0, slide_mpp))

    def encode_slide_from_patch_features(
        self, tile_embeddings: np.ndarray, coords: np.ndarray, patch_size_lv0: int | float
    ) -> np.ndarray:
        """The official entry point's semantics, for TRIDENT/CLAM coordinates and ``patch_size_level0``."""
        return self.embed_cells(tile_embeddings, official_cells(coords, patch_size_lv0))

    @torch.inference_mode()
    def embed_cells(self, tile_embeddings: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """``(N, 768)`` features + grid cells ``(N, 2)`` -> ``(768,)`` float32."""
        tiles = np.asarray(tile_embeddings)
        if tiles.ndim != 2 or tiles.shape[1] != self.net.config.in_dim or tiles.shape[0] == 0:
            raise ValueError(f"tile_embeddings must be (N >= 1, {self.net.config.in_dim}), got {tiles.shape}")
        if cells.shape != (tiles.shape[0], 2):
            raise ValueError(f"{tiles.shape[0]} tile embeddings but {cells.shape[0]} coordinates")
        admit(ARCHITECTURE, tiles.shape[0], BYTES_PER_TOKEN, FIXED_BYTES, self.device)
        t = torch.from_numpy(tiles.astype(np.float32)).to(self.device)
        out = self.net(t, torch.from_numpy(cells).to(self.device))
        return out.float().cpu().numpy()

    def max_tiles(self) -> int:
        """Most tiles one slide may have on this device with the memory free now (linear model
        ``FIXED_BYTES + BYTES_PER_TOKEN * tiles``; weights are already resident)."""
        return max(0, (available_memory_bytes(self.device) - FIXED_BYTES) // BYTES_PER_TOKEN)

    def provenance(self) -> dict[str, Any]:
        """What defines this encoder's outputs (written next to slide embeddings)."""
        return {
            "architecture": ARCHITECTURE,
            "implementation": "pathray.slide_level.encoders.titan (plain PyTorch, fp32, chunked ALiBi attention)",
            "pooling": "attn_pool_contrastive, no projection (encode_slide_from_patch_features)",
            "embed_dim": self.net.config.embed_dim,
            "tiles": f"conch-v1.5 features of {TITAN_TILES.tile_px}-px tiles at {TITAN_TILES.target_mpp} µm/px",
            "weights": self.source,
            "weights_fingerprint": self.fingerprint,
            "coordinate_rule": COORDINATE_RULE,
        }


def read_vision_part(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The slide encoder's tensors of a release-layout checkpoint, prefix stripped. For
    ``.safetensors`` only the non-ignored keys are read; unknown keys are kept (as they are)
    so that the strict load names them."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return from_release_layout(read_state_dict(path), CHECKPOINT_PREFIX, CHECKPOINT_IGNORE)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(CHECKPOINT_IGNORE)}
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsCorruptError(f"cannot parse safetensors file {path}: {exc}") from exc
    return from_release_layout(state, CHECKPOINT_PREFIX, CHECKPOINT_IGNORE)


def random_titan_net(seed: int = 0, config: TitanConfig = RELEASED_CONFIG) -> TitanSlideNet:
    """A random init of the exact architecture in which every parameter matters (tests, benchmarks).

    Drawn with ``numpy.random.default_rng(seed).random`` (uniform doubles, a stream stable
    across numpy versions) in ``named_parameters`` order: matrices U(-a, a) with
    ``a = sqrt(3 / fan_in)`` (fan_in = last dimension), biases U(-0.05, 0.05), LayerNorm scales
    1 + U(-0.3, 0.3), the CLS token and pooler queries U(-1, 1). Same seed, same weights anywhere.
    """
    with torch.device("meta"):
        net = TitanSlideNet(config)
    rng = np.random.default_rng(seed)
    state = {}
    for name, p in net.named_parameters():
        u = rng.random(tuple(p.shape)) * 2 - 1
        if name == "cls_token" or name.endswith(".query"):
            value = u
        elif name.endswith("bias"):
            value = u * 0.05
        elif p.ndim == 1:  # LayerNorm scale
            value = 1 + u * 0.3
        else:
            value = u * np.sqrt(3.0 / p.shape[-1])
        state[name] = torch.from_numpy(value.astype(np.float32))
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


#: stand-ins for the release's text tower (real key names, shapes irrelevant: they are never read)
TEXT_PART_STANDIN = (
    "text_encoder.token_embedding.weight",
    "text_encoder.positional_embedding",
    "text_encoder.ln_final.weight",
)


def write_random_weights(directory: str | os.PathLike, seed: int = 0, config: TitanConfig = RELEASED_CONFIG) -> Path:
    """Save :func:`random_titan_net` as the release is laid out: ``<directory>/model.safetensors``
    with the slide encoder under ``vision_encoder.`` and (stand-in) text-tower keys under
    ``text_encoder.``. Returns the file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        CHECKPOINT_PREFIX + k: v.detach().contiguous() for k, v in random_titan_net(seed, config).state_dict().items()
    }
    state.update({k: torch.zeros(4, 8) for k in TEXT_PART_STANDIN})
    save_file(state, str(directory / HUB_FILENAME), metadata={"format": "pt"})
    return directory / HUB_FILENAME


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, shapes, dtypes and bytes of a state dict (serialisation-independent)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
