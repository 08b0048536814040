"""Slide aggregators: tile embeddings of one slide -> one slide embedding.

Aggregators are specs as data (:data:`AGGREGATORS`): a name, what tile embeddings they
accept, their output width, whether they need weights and an accelerator, and a
``"module:callable"`` builder imported only when the aggregator is built, so a slide encoder
whose module is absent or heavy costs nothing to list. A built aggregator is called once
per slide with a :class:`SlideTiles` and returns a ``(D_out,)`` float32 vector.

:func:`slide_embeddings` pools a store dataset on the driver (small cohorts, notebooks);
``pathray aggregate`` (:mod:`pathray.slide_level.job`) runs any aggregator as a Ray Data job
and writes the results back to the store.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

#: µm/px of tiles "at 10x", the convention TRIDENT's ``--mag 10`` and CHIEF's/MADELEINE's READMEs
#: follow (10x = 1.0 µm/px, 20x = 0.5); their tiles are 256 px there
MAG_10X_MPP = 1.0

POOLINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda e: e.mean(axis=0),
    "max": lambda e: e.max(axis=0),
}


@dataclass(frozen=True)
class SlideTiles:
    """One slide's tiles as an aggregator sees them, in ``tile_index`` order."""

    slide_id: str
    embeddings: np.ndarray  # (N, D) float32
    x_level0: np.ndarray  # (N,) int64, tile top-left, level-0 px
    y_level0: np.ndarray  # (N,) int64
    slide_mpp: float  # level-0 µm/px of the slide the tiles were cut from


class Aggregator(Protocol):
    def __call__(self, tiles: SlideTiles) -> np.ndarray: ...  # (D_out,) float32

    def provenance(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TileGeometry:
    """The tiles a slide encoder was trained on: ``tile_px``-px tiles at ``target_mpp`` µm/px,
    on a grid without overlap (stride = tile)."""

    tile_px: int
    target_mpp: float

    def matches(self, tiling: dict[str, Any]) -> bool:
        """Whether a store's tiling record (``pathray.job.config.tiling_record``) cuts these tiles."""
        return (
            tiling.get("tile_px") == self.tile_px
            and tiling.get("stride_px") in (None, self.tile_px)
            and abs(float(tiling.get("target_mpp") or 0) - self.target_mpp) <= 1e-9 * self.target_mpp
        )

    def describe(self) -> str:
        return f"{self.tile_px}-px tiles at {self.target_mpp:g} µm/px without overlap"


#: the tiles TITAN was trained on: CONCH v1.5 features of 512-px tiles at 0.5 µm/px (20x)
TITAN_TILES = TileGeometry(tile_px=512, target_mpp=0.5)


def describe_tiling(tiling: dict[str, Any]) -> str:
    """A store's tiling record in words."""
    stride = tiling.get("stride_px")
    overlap = "without overlap" if stride in (None, tiling.get("tile_px")) else f"with a {stride}-px stride"
    return f"{tiling.get('tile_px')}-px tiles at {tiling.get('target_mpp'):g} µm/px {overlap}"


@dataclass(frozen=True)
class AggregatorSpec:
    """What an aggregator is. ``builder`` is ``"module:callable"``, called as
    ``callable(weights: str | None, device: str) -> Aggregator``. ``tile_models`` and
    ``tiles`` state what it needs from a store; ``pathray aggregate`` refuses a store that does
    not have it, with the ``pathray embed`` command that would (:meth:`embed_command`)."""

    name: str
    description: str
    builder: str
    input_dim: int | None = None  # tile embedding width it requires (None: any)
    output_dim: int | None = None  # slide embedding width (None: the tile width)
    tile_models: tuple[str, ...] = ()  # tile models it was trained on (empty: any)
    needs_weights: bool = False  # False: --weights is ignored
    accelerated: bool = False  # True: runs on GPU actors when the cluster has GPUs
    tiles: TileGeometry | None = None  # the tiling it needs (None: any)

    def record(self, weights: str | None) -> dict[str, Any]:
        """JSON-able identity of this aggregator with these weights (provenance, store guard)."""
        return {
            "aggregator": self.name,
            "builder": self.builder,
            "weights": weights if self.needs_weights else None,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "tile_models": list(self.tile_models),
            **({"tiles": self.tiles.describe()} if self.tiles else {}),
        }

    def embed_command(self, out: str) -> str:
        """The ``pathray embed`` command line that writes the tile features this aggregator needs to ``out``."""
        tiling = f" --tile-px {self.tiles.tile_px} --target-mpp {self.tiles.target_mpp:g}" if self.tiles else ""
        models = ",".join(self.tile_models[:1]) or "MODEL"
        return f"pathray embed --manifest MANIFEST --models {models}{tiling} --out {out}"

    def out_dim(self, tile_dim: int) -> int:
        return self.output_dim or tile_dim


AGGREGATORS: dict[str, AggregatorSpec] = {
    s.name: s
    for s in (
        AggregatorSpec(
            "mean", "mean of the slide's tile embeddings", "pathray.slide_level.aggregators:Pooling.build_mean"
        ),
        AggregatorSpec(
            "max",
            "element-wise max of the slide's tile embeddings",
            "pathray.slide_level.aggregators:Pooling.build_max",
        ),
        AggregatorSpec(
            "gigapath-slide",
            "Prov-GigaPath slide encoder (LongNet, gigapath_slide_enc12l768d) over tile embeddings "
            "and level-0 coordinates",
            "pathray.slide_level.aggregators:build_gigapath_slide",
            input_dim=1536,
            output_dim=768,
            tile_models=("prov-gigapath",),
            needs_weights=True,
            accelerated=True,
        ),
        AggregatorSpec(
            "chief",
            "CHIEF WSI_feature: gated attention-MIL pooling of CTransPath-CHIEF tile embeddings (tiles: 256 px "
            "at 10x, ~1 µm/px); --weights CHIEF_pretraining.pth",
            "pathray.slide_level.encoders.chief:aggregator",
            input_dim=768,
            output_dim=768,
            tile_models=("ctranspath",),
            needs_weights=True,
            tiles=TileGeometry(tile_px=256, target_mpp=MAG_10X_MPP),
        ),
        AggregatorSpec(
            "madeleine",
            "MADELEINE encode_he: 4-head gated attention-MIL over CONCH v1 tile embeddings (tiles: 256 px "
            "at 10x, ~1 µm/px); weights MahmoodLab/madeleine model.pt",
            "pathray.slide_level.encoders.madeleine:aggregator",
            input_dim=512,
            output_dim=512,
            tile_models=("conch-v1",),
            needs_weights=True,
            tiles=TileGeometry(tile_px=256, target_mpp=MAG_10X_MPP),
        ),
        AggregatorSpec(
            "feather",
            "FEATHER-24K (MIL-Lab abmil.base.conch_v15.pc108-24k) forward_features: gated ABMIL over CONCH "
            "v1.5 tile embeddings (tiles: 512 px at 20x, ~0.5 µm/px)",
            "pathray.slide_level.encoders.feather:aggregator",
            input_dim=768,
            output_dim=512,
            tile_models=("conch-v1.5",),
            needs_weights=True,
        ),
        AggregatorSpec(
            "prism",
            "PRISM (paige-ai/Prism) image_embedding: Perceiver resampler over Virchow v1 tile embeddings "
            "(class token ++ mean patch token; tiles: 224 px at 20x, 0.5 µm/px)",
            "pathray.slide_level.encoders.prism:aggregator",
            input_dim=2560,
            output_dim=1280,
            tile_models=("virchow",),
            needs_weights=True,
            accelerated=True,
        ),
        AggregatorSpec(
            "titan",
            "TITAN slide encoder (MahmoodLab/TITAN vision part: 6-layer ViT with 2-D ALiBi over the tile grid, "
            "attentional pooling) over conch-v1.5 features of 512-px tiles at 0.5 µm/px",
            "pathray.slide_level.aggregators:build_titan",
            input_dim=768,
            output_dim=768,
            tile_models=("conch-v1.5",),
            needs_weights=True,
            accelerated=True,
            tiles=TITAN_TILES,
        ),
    )
}


def get_aggregator(name: str) -> AggregatorSpec:
    """The spec named ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}") from None


def build_aggregator(spec: AggregatorSpec, weights: str | None = None, device: str = "cpu") -> Aggregator:
    """Import ``spec.builder`` and build the aggregator (loads weights, moves to ``device``)."""
    module, _, attr = spec.builder.partition(":")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    return target(weights, device)


class Pooling:
    """Mean or max over the tiles, in float32 (float16 tile embeddings are widened first)."""

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def build_mean(cls, weights: str | None, device: str) -> Pooling:
        return cls("mean")

    @classmethod
    def build_max(cls, weights: str | None, device: str) -> Pooling:
        return cls("max")

    def __call__(self, tiles: SlideTiles) -> np.ndarray:
        return POOLINGS[self.name](tiles.embeddings.astype(np.float32, copy=False)).astype(np.float32)

    def provenance(self) -> dict[str, Any]:
        return {"aggregator": self.name}


class SlideEncoderAggregator:
    """Adapts a slide encoder ``(embeddings, x_level0, y_level0, slide_mpp) -> (D,)``. With a
    ``memory`` model ``(bytes per tile, fixed bytes, device)`` a slide that would not fit the
    memory free now is refused first (:func:`pathray.slide_level.encoders.memory.admit`)."""

    def __init__(self, encoder: Any, memory: tuple[int, int, str] | None = None):
        self.encoder, self.memory = encoder, memory

    def __call__(self, tiles: SlideTiles) -> np.ndarray:
        if self.memory is not None:
            from pathray.slide_level.encoders.memory import admit

            per_tile, fixed, device = self.memory
            admit(type(self.encoder).__name__, len(tiles.embeddings), per_tile, fixed, device)
        out = self.encoder(tiles.embeddings, tiles.x_level0, tiles.y_level0, tiles.slide_mpp)
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def provenance(self) -> dict[str, Any]:
        return self.encoder.provenance()


def build_gigapath_slide(weights: str | None, device: str) -> SlideEncoderAggregator:
    from pathray.slide_level.encoders.gigapath import GigaPathSlideEncoder

    return SlideEncoderAggregator(GigaPathSlideEncoder.from_weights(weights, device=device))


def build_titan(weights: str | None, device: str) -> SlideEncoderAggregator:
    from pathray.slide_level.encoders.titan import TitanSlideEncoder

    return SlideEncoderAggregator(TitanSlideEncoder.from_weights(weights, device=device))


def slide_embeddings(dataset: pads.Dataset, pooling: str = "mean", min_tissue_fraction: float = 0.0) -> pa.Table:
    """One row per slide of ``dataset`` (e.g. ``FeatureStore(root).dataset(model)``):
    ``slide_id``, ``cohort``, ``n_tiles`` and ``embedding`` (float32, pooled over the
    slide's tiles with ``tissue_fraction >= min_tissue_fraction``), on the driver, one
    file at a time. Pooling: mean | max. For whole cohorts, ``pathray aggregate``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    pool, rows = Pooling(pooling), []
    for fragment in dataset.get_fragments():
        table = fragment.to_table(columns=["slide_id", "embedding", "tissue_fraction"], schema=dataset.schema)
        keep = table.column("tissue_fraction").to_numpy() >= min_tissue_fraction
        if not keep.any():
            continue
        emb = table.column("embedding").combine_chunks()
        flat = emb.values.to_numpy().reshape(len(table), emb.type.list_size)[keep]
        keys = pads.get_partition_keys(fragment.partition_expression)
        slide_id = table.column("slide_id")[0].as_py()
        rows.append(
            {
                "slide_id": slide_id,
                "cohort": keys.get("cohort"),
                "n_tiles": int(keep.sum()),
                "embedding": pool(SlideTiles(slide_id, flat, np.empty(0), np.empty(0), float("nan"))),
            }
        )
    dim = len(rows[0]["embedding"]) if rows else 0
    schema = pa.schema(
        [
            ("slide_id", pa.string()),
            ("cohort", pa.string()),
            ("n_tiles", pa.int64()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)
