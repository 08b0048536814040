"""Prov-GigaPath slide encoder ``gigapath_slide_enc12l768d``: tile embeddings + coordinates -> slide embedding.

Architecture (official ``gigapath/slide_encoder.py`` ``LongNetViT``; see
:mod:`pathray.slide_level.encoders.longnet` for the encoder): a 1536 -> 768 linear patch embed,
plus a fixed 2-D sin-cos position embedding of a 1000 x 1000 grid indexed by
``floor(coord / 256)``, a learned CLS token (position row 0, all zeros) in front, 12 LongNet
layers of dilated attention, then CLS pooling after the final LayerNorm (or, with
``global_pool``, LayerNorm of the mean of the tile tokens).

**Coordinate contract.** The official model takes each tile's top-left in pixels of the
slide's 0.5 µm/px image, tiles being 256 px on that image (maintainers, prov-gigapath issue
#116: "you should do it at the same level (0.5mpp)"). pathray stores level-0 pixels;
:func:`gigapath_coords` converts them (see its docstring), and ``__call__`` applies it.

**Weights.** ``slide_encoder.pth`` of ``prov-gigapath/prov-gigapath`` (its ``model`` state
dict), from the HF hub or disk, loaded strictly: every key and shape must match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pathray.encoders.checkpoint import (
    load_into,
    read_state_dict,
)

from .longnet import LongNetConfig, LongNetEncoder
from .release import Release, resolve_weights

ARCHITECTURE = "gigapath_slide_enc12l768d"
HUB_REPO = "prov-gigapath/prov-gigapath"
HUB_FILENAME = "slide_encoder.pth"
#: the released file, for :func:`pathray.slide_level.encoders.release.resolve_weights`
RELEASE = Release(
    architecture=ARCHITECTURE,
    filename=HUB_FILENAME,
    hub_repo=HUB_REPO,
    obtain="request access at https://huggingface.co/prov-gigapath/prov-gigapath, then `hf auth login` or HF_TOKEN",
)
#: µm/px of the image whose pixels the official coordinates count
GIGAPATH_MPP = 0.5
#: tile side (px at GIGAPATH_MPP) of the official grid: coordinates are divided by this
GIGAPATH_TILE_PX = 256
#: side of the position-embedding grid
SLIDE_NGRIDS = 1000
COORDINATE_RULE = (
    "coords = floor((x_level0 + 0.5) * slide_mpp / 0.5 + 1e-6): the 0.5 µm/px pixel holding the centre of the tile's "
    "top-left level-0 pixel; grid cell = floor(coords / 256), position index = cell_x * 1000 + cell_y + 1"
)


@dataclass(frozen=True)
class SlideEncoderConfig:
    """Shape of the slide encoder (defaults: the released ``gigapath_slide_enc12l768d``)."""

    in_dim: int = 1536
    longnet: LongNetConfig = field(default_factory=LongNetConfig)
    slide_ngrids: int = SLIDE_NGRIDS
    tile_size: int = GIGAPATH_TILE_PX
    norm_eps: float = 1e-6  # the ViT's final LayerNorm
    global_pool: bool = False  # False: CLS token (the card's default); True: mean of tile tokens


def gigapath_coords(x_level0: np.ndarray, y_level0: np.ndarray, slide_mpp: float) -> np.ndarray:
    """Level-0 tile top-lefts -> the official coordinates: ``(N, 2)`` float32 pixels of the
    0.5 µm/px image, ``floor((v + 0.5) * slide_mpp / 0.5)``, i.e. the 0.5 µm/px pixel that
    holds the centre of the tile's first level-0 pixel.

    For a pathray grid of 256-px tiles at 0.5 µm/px (``x = round(i * 256 * 0.5 / slide_mpp)``)
    this gives exactly ``256 * i`` whenever ``slide_mpp <= 0.5`` — the official preprocessing's
    integer coordinates — and always ``floor(coord / 256) == i`` (coarser slides included),
    where the plain ``x * slide_mpp / 0.5`` falls just below ``256 * i`` about half the time
    (e.g. x = 973 at 0.2631 µm/px -> 511.99, cell 1 instead of 2). A 1e-6 px allowance
    absorbs floating-point error at exact pixel boundaries.
    """
    if not (slide_mpp > 0 and np.isfinite(slide_mpp)):
        raise ValueError(f"slide_mpp must be a positive number of µm/px, got {slide_mpp!r}")
    xy = np.stack([np.asarray(x_level0, dtype=np.float64).ravel(), np.asarray(y_level0, dtype=np.float64).ravel()], 1)
    return np.floor((xy + 0.5) * (slide_mpp / GIGAPATH_MPP) + 1e-6).astype(np.float32)


def sincos_position_embedding(cells: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows of the official fixed table (``get_2d_sincos_pos_embed(dim, 1000)``) for grid
    ``cells`` ``(N, 2)`` = (cell_x, cell_y): ``[sin, cos](cell_y * w) ++ [sin, cos](cell_x * w)``
    with ``w = 10000 ** -(arange(dim/4) / (dim/4))``, computed in float64 like the official
    numpy code and rounded to float32 — only the rows needed, not the 3 GB table."""
    quarter = dim // 4
    omega = np.arange(quarter, dtype=float)
    omega /= quarter
    omega = 1.0 / 10000**omega
    cells_np = cells.cpu().numpy().astype(np.float64)
    halves = []
    for axis in (1, 0):  # the table's first half encodes the row-minor index (cell_y)
        out = np.einsum("m,d->md", cells_np[:, axis], omega)
        halves += [np.sin(out), np.cos(out)]
    return torch.from_numpy(np.concatenate(halves, axis=1)).float()


class GigaPathSlideNet(nn.Module):
    """``LongNetViT`` with the official parameter names (``patch_embed.proj``, ``cls_token``,
    ``encoder.*``, ``norm``); the position table is computed per call, not stored."""

    def __init__(self, config: SlideEncoderConfig = SlideEncoderConfig()):
        super().__init__()
        dim = config.longnet.embed_dim
        self.config = config
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(config.in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = LongNetEncoder(config.longnet)
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)

    def grid_cells(self, coords: torch.Tensor) -> torch.Tensor:
        """``floor(coords / tile_size)`` as int64 ``(N, 2)``; refuses cells off the 1000 x 1000
        grid (the official code would index out of range or alias another row there)."""
        cells = torch.floor(coords.double() / self.config.tile_size).long()
        n = self.config.slide_ngrids
        if cells.numel() and (int(cells.min()) < 0 or int(cells.max()) >= n):
            raise ValueError(
                f"tile coordinates fall outside the {n} x {n} grid of {self.config.tile_size}-px cells "
                f"(cells {int(cells.min())}..{int(cells.max())})"
            )
        return cells

    def forward(self, tiles: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tiles (L, in_dim)``, ``coords (L, 2)`` (official coordinates) -> ``(pooled (dim,),
        all_layers (depth + 1, dim))``: the official ``model(x, coords)`` output, and its
        ``all_layer_embed=True`` outputs (input + each layer, pooled without the encoder's
        output LayerNorm), from one pass."""
        pos = sincos_position_embedding(self.grid_cells(coords), self.cls_token.shape[-1]).to(tiles.device)
        x = self.patch_embed.proj(tiles) + pos
        x = torch.cat([self.cls_token[0], x])[None]
        final, states = self.encoder(x)
        return self._pool(final), torch.stack([self._pool(s) for s in states])

    def _pool(self, state: torch.Tensor) -> torch.Tensor:
        """CLS after the final LayerNorm, or (``global_pool``) LayerNorm of the tile tokens' mean."""
        if self.config.global_pool:
            return self.norm(state[0, 1:].mean(dim=0))
        return self.norm(state)[0, 0]


class GigaPathSlideEncoder:
    """Slide embeddings from one slide's Prov-GigaPath tile embeddings and level-0 coordinates."""

    def __init__(self, net: GigaPathSlideNet, device: str, source: str, fingerprint: str):
        self.net = net.to(device).eval()
        self.device = device
        self.source = source
        self.fingerprint = fingerprint

    @classmethod
    def from_weights(
        cls, source: str | os.PathLike | None, device: str = "cpu", *, global_pool: bool = False
    ) -> GigaPathSlideEncoder:
        """``source``: ``None`` (``slide_encoder.pth`` of the hub repo), ``hf-hub:org/name[@rev]``,
        a ``slide_encoder.pth``-shaped file (``{"model": state_dict}``, read with
        ``weights_only=True``) or a directory holding one. Raises ``WeightsUnavailableError``,
        ``WeightsCorruptError`` or ``WeightsMismatchError`` (strict keys and shapes)."""
        path, label, fingerprint = resolve_weights(RELEASE, source)
        with torch.device("meta"):
            net = GigaPathSlideNet(SlideEncoderConfig(global_pool=global_pool))
        load_into(net, read_state_dict(path), what=f"{ARCHITECTURE} weights {label}")
        return cls(net, device, label, fingerprint)

    def __call__(
        self, tile_embeddings: np.ndarray, x_level0: np.ndarray, y_level0: np.ndarray, slide_mpp: float
    ) -> np.ndarray:
        """``(N, 1536)`` tile embeddings (any float dtype) + level-0 tile top-lefts + the slide's
        µm/px -> ``(768,)`` float32 slide embedding (the card's ``slide_encoder(tiles, coords)``)."""
        return self.embed(tile_embeddings, x_level0, y_level0, slide_mpp)[0]

    def all_layers(
        self, tile_embeddings: np.ndarray, x_level0: np.ndarray, y_level0: np.ndarray, slide_mpp: float
    ) -> np.ndarray:
        """``(depth + 1, 768)`` float32: the pooled embedding of every hidden state (official
        ``all_layer_embed=True``; its last row is the official pipeline's ``last_layer_embed``)."""
        return self.embed(tile_embeddings, x_level0, y_level0, slide_mpp)[1]

    @torch.inference_mode()
    def embed(
        self, tiles: np.ndarray, x_level0: np.ndarray, y_level0: np.ndarray, slide_mpp: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both outputs from one pass: ``((768,), (depth + 1, 768))`` float32."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 2 or tiles.shape[1] != self.net.config.in_dim or tiles.shape[0] == 0:
            raise ValueError(f"tile_embeddings must be (N >= 1, {self.net.config.in_dim}), got {tiles.shape}")
        coords = gigapath_coords(x_level0, y_level0, slide_mpp)
        if coords.shape[0] != tiles.shape[0]:
            raise ValueError(f"{tiles.shape[0]} tile embeddings but {coords.shape[0]} coordinates")
        t = torch.from_numpy(tiles.astype(np.float32)).to(self.device)
        pooled, layers = self.net(t, torch.from_numpy(coords).to(self.device))
        return pooled.float().cpu().numpy(), layers.float().cpu().numpy()

    def provenance(self) -> dict[str, Any]:
        """What defines this encoder's outputs (written next to slide embeddings)."""
        cfg = self.net.config
        return {
            "architecture": ARCHITECTURE,
            "implementation": "pathray.slide_level.encoders.gigapath (plain PyTorch, fp32)",
            "pooling": "mean of tile tokens, then LayerNorm" if cfg.global_pool else "CLS after the final LayerNorm",
            "embed_dim": cfg.longnet.embed_dim,
            "segment_lengths": list(cfg.longnet.segment_lengths),
            "dilated_ratios": list(cfg.longnet.dilated_ratios),
            "weights": self.source,
            "weights_fingerprint": self.fingerprint,
            "coordinate_rule": COORDINATE_RULE,
        }


def random_slide_net(seed: int = 0, config: SlideEncoderConfig = SlideEncoderConfig()) -> GigaPathSlideNet:
    """A random init of the exact architecture in which every parameter matters (tests, demo).

    Drawn with ``numpy.random.default_rng(seed).random`` (uniform doubles, a stream stable
    across numpy versions) in ``named_parameters`` order: weights U(-a, a) with
    ``a = sqrt(3 / fan_in)``, biases U(-0.05, 0.05), LayerNorm scales 1 + U(-0.3, 0.3), the
    CLS token U(-1, 1). The same seed gives the same weights on any machine.
    """
    with torch.device("meta"):
        net = GigaPathSlideNet(config)
    rng = np.random.default_rng(seed)
    state = {}
    for name, p in net.named_parameters():
        u = rng.random(tuple(p.shape)) * 2 - 1
        if name == "cls_token":
            value = u
        elif name.endswith("bias"):
            value = u * 0.05
        elif p.ndim == 1:  # LayerNorm scale
            value = 1 + u * 0.3
        else:
            value = u * np.sqrt(3.0 / p.shape[1])
        state[name] = torch.from_numpy(value.astype(np.float32))
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


def write_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save :func:`random_slide_net` as the released file is laid out: ``{"model": state_dict}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in random_slide_net(seed).state_dict().items()}
    torch.save({"model": state}, path)
    return path
