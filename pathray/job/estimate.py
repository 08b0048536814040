"""The dry run: what a run would do, without starting Ray or writing anything.

:func:`dry_run_plan` reports the slides to do, the tiles to embed (:func:`estimate_tiles` from
an IDC manifest's image sizes, else a few slides planned for real), the objects the run would
write, GPU-hours per model and the resource plan here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pathray.encoders.custom import CustomEncoder
from pathray.errors import SlideIdConflictError
from pathray.job.config import JobConfig
from pathray.job.localrun import choose_runner
from pathray.job.modelplan import plan_models
from pathray.job.outage import read_reachable
from pathray.job.resources import local_gpus, plan_resources
from pathray.job.resume import ResumeState, resume_state
from pathray.job.rows import slide_row
from pathray.job.stageplan import Stage, build_stages
from pathray.job.storeversion import StoreRecords, choose_store
from pathray.manifest import SlideEntry
from pathray.tiling.grid import TilingGroup

log = logging.getLogger("pathray")


def dry_run_plan(
    config: JobConfig, sample: int = 8, custom_encoders: dict[str, CustomEncoder] | None = None
) -> dict[str, Any]:
    """What a run would do, without starting Ray: slides to do / already committed, the tiles
    to embed and GPU-hours per model, and the resource plan for the local machine (or the
    cluster at ``RAY_ADDRESS`` once the job runs there). Checks the store's config as the run
    would: a mismatch the run would refuse raises :class:`StoreConfigMismatchError` here too
    (with ``new_version``, the plan names the version it would write).

    Tiles: a manifest whose rows all carry the index's geometry (``width_px``, ``height_px``,
    ``index_mpp``: ``pathray manifest idc --sm-index``) is estimated from it without opening a
    slide (the full grid, an upper bound: no tissue filter); otherwise up to ``sample`` slides
    are planned for real and the mean is extrapolated. ``custom_encoders`` as for
    :func:`pathray.job.raydata.run_job`. Slide ids committed from another slide are listed in
    ``slide_id_conflicts``."""
    plans, unknown = plan_models(config, custom_encoders)
    models = [m.name for m in plans]
    entries = read_reachable(config)
    log.info("checking the store's config and listing its committed slides")
    store = choose_store(config, StoreRecords.of(config, plans))
    state = resume_state(store, models, entries)
    todo = [e for e, _ in state.todo]
    planner = build_stages(config, plans, store.root).plan
    per_group = [
        dict(
            tile_px=g.tiling.tile_px,
            target_mpp=g.tiling.target_mpp,
            models=list(g.models or models),
            **_estimate_tiles(planner, g, todo, sample),
        )
        for g in config.tiling_groups(models)
    ]
    return {
        "models": models,
        "unknown_models": [name for name, _ in unknown],
        "tiling": config.tiling.to_dict(),
        "tilings": per_group,
        "store": store.root,
        "store_exists": store.read_config() is not None,
        **_slides(entries, state),
        **_work(per_group, len(todo), config.chunk_tiles),
        **_resources_here(config, len(models)),
    }


def _slides(entries: list[SlideEntry], state: ResumeState) -> dict[str, Any]:
    """The manifest's slides: how many, committed, to do, and the slide id conflicts."""
    return {
        "slides_in_manifest": len(entries),
        "slides_already_committed": state.fully_committed(entries),
        "slides_to_do": len(state.todo),
        "slide_id_conflicts": [
            {"slide_id": e.slide_id, "model": m, "error_type": SlideIdConflictError.error_type, "message": message}
            for e, m, message in state.conflicts
        ],
    }


def _work(per_group: list[dict], slides: int, chunk_tiles: int) -> dict[str, Any]:
    """The work of the slides to do: tiles (and how they were estimated), chunks, store objects, GPU-hours."""
    return {
        "tile_estimate": per_group[0]["tile_estimate"],
        "estimated_tiles": sum(g["estimated_tiles"] for g in per_group),
        "sampled_slides": per_group[0]["sampled_slides"],
        "sample_errors": per_group[0]["sample_errors"],
        "estimated_chunks": sum(_chunks(g["estimated_tiles"], slides, chunk_tiles) for g in per_group),
        "store_objects": _store_objects(per_group, slides, chunk_tiles),
        "gpu_hours": _gpu_hours({m: g["estimated_tiles"] for g in per_group for m in g["models"]}),
    }


def _resources_here(config: JobConfig, n_models: int) -> dict[str, Any]:
    """This machine's CPUs/GPUs, the runner ``auto`` picks here and the resource plan it gets."""
    cluster = {"CPU": float(os.cpu_count() or 1), "GPU": float(local_gpus())}
    return {
        "local_resources": cluster,
        "runner_here": choose_runner(config),
        "resource_plan_here": dataclasses.asdict(plan_resources(config, cluster, max(1, n_models))),
    }


def _store_objects(per_group: list[dict], slides: int, chunk_tiles: int) -> dict[str, int]:
    """Objects the run would write: one features file and one commit record per (slide, model)
    and one staged object per (chunk, model), deleted once its slide commits."""
    pairs = slides * sum(len(g["models"]) for g in per_group)
    staged = sum(_chunks(g["estimated_tiles"], slides, chunk_tiles) * len(g["models"]) for g in per_group)
    return {"features_files": pairs, "commit_records": pairs, "staged_chunks_transient": staged}


def _chunks(tiles: int, slides: int, chunk_tiles: int) -> int:
    """Chunks for ``tiles`` spread evenly over ``slides`` slides."""
    return round(math.ceil(tiles / max(slides, 1) / chunk_tiles) * slides) if tiles else 0


def _estimate_tiles(planner: Stage, group: TilingGroup, todo: list[SlideEntry], sample: int) -> dict[str, Any]:
    """The tiles of ``group``'s tiling over the slides ``todo``: from the index geometry when
    every row has it, else the mean of up to ``sample`` slides planned by ``planner`` (the run's
    plan stage) times the slides to do."""
    rows = [{"slide_id": e.slide_id, **e.extra} for e in todo]
    tiling = group.tiling
    if rows and all(r.get("width_px") and r.get("index_mpp") for r in rows):
        estimate = estimate_tiles(rows, tiling.tile_px, tiling.target_mpp, tiling.stride_px)
        return {
            "tile_estimate": "index geometry (full grid, no tissue filter: an upper bound)",
            "estimated_tiles": estimate.grid_tiles,
            "sampled_slides": 0,
            "sample_errors": [],
        }
    counts, errors = _plan_sample(planner, group, todo[:sample])
    mean_tiles = float(np.mean(counts)) if counts else 0.0
    return {
        "tile_estimate": f"mean of {len(counts)} planned slides x slides to do",
        "estimated_tiles": round(mean_tiles * len(todo)),
        "sampled_slides": len(counts),
        "sample_errors": errors,
    }


def _plan_sample(planner: Stage, group: TilingGroup, sample: list[SlideEntry]) -> tuple[list[int], list[dict]]:
    """Plan ``sample``'s slides at ``group``'s tiling: each slide's tile count (0 when planning
    failed) and the planning errors."""
    stage = planner.build()
    counts, errors = [], []
    try:
        for i, e in enumerate(sample):
            log.info("planning sample slide %d/%d: %s (%s)", i + 1, len(sample), e.slide_id, e.path)
            (first, *_) = stage.plan_one(slide_row(e, list(group.models or [])))
            if first["status"] == "error":
                errors.append(
                    {"slide_id": e.slide_id, "error_type": first["error_type"], "message": first["error_message"]}
                )
            counts.append(first["n_tiles_slide"])
    finally:
        stage.scratch.close()
    return counts, errors


def _gpu_hours(tiles: dict[str, int]) -> dict[str, Any]:
    """GPU-hours per registered model (``tiles``: the tiles each embeds) at the 50 %-MFU target
    rate on one H100 (bf16): a planning figure, not a measurement (no benchmarked GPU rate is
    recorded yet)."""
    from pathray.encoders.cost import TARGET_MFU, target_tiles_per_s
    from pathray.encoders.registry import REGISTRY

    hours = {m: round(n / target_tiles_per_s(m) / 3600, 2) for m, n in tiles.items() if m in REGISTRY}
    return {"basis": f"target rate at {TARGET_MFU:.0%} MFU on one H100 (bf16), not measured", "per_model": hours}


@dataclass(frozen=True)
class TileEstimate:
    """Tiles a job would grid, from image sizes alone (nothing read from the bucket).

    ``grid_tiles`` counts every tile of each slide's full grid (no tissue filter: an upper
    bound on what the job keeps); ``rows_without_geometry`` lists slide_ids lacking a size or
    µm/px, which are not counted."""

    grid_tiles: int
    slides_counted: int
    rows_without_geometry: tuple[str, ...]


def grid_tiles(
    width_px: int, height_px: int, mpp: float, tile_px: int, target_mpp: float, stride_px: int | None = None
) -> int:
    """Tiles in the full grid of a ``width_px`` x ``height_px`` (level-0 px) slide at ``mpp`` µm/px:
    :func:`pathray.tiling.grid.grid_shape`, the rule :func:`pathray.tiling.grid.plan_tiles` grids by
    (``stride_px`` in target px; ``None``: ``tile_px``, no overlap)."""
    from pathray.tiling.grid import grid_shape

    cols, rows = grid_shape(width_px, height_px, tile_px * target_mpp / mpp, (stride_px or tile_px) * target_mpp / mpp)
    return cols * rows


def _number(value: object) -> float | None:
    """A finite positive number from a manifest cell (CSV cells arrive as text), else None."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def estimate_tiles(
    manifest_rows: Sequence[dict], tile_px: int, target_mpp: float, stride_px: int | None = None
) -> TileEstimate:
    """Sum :func:`grid_tiles` over manifest rows carrying ``width_px``, ``height_px`` (level-0 px)
    and ``index_mpp`` (µm/px), the geometry columns IDC's SM index gives per series
    (``max_TotalPixelMatrixColumns``/``Rows``, ``min_PixelSpacing_2sf`` in mm x 1000)."""
    total, counted, missing = 0, 0, []
    for row in manifest_rows:
        width, height, mpp = (_number(row.get(k)) for k in ("width_px", "height_px", "index_mpp"))
        if not width or not height or not mpp:
            missing.append(row["slide_id"])
            continue
        total += grid_tiles(int(width), int(height), mpp, tile_px, target_mpp, stride_px)
        counted += 1
    return TileEstimate(total, counted, tuple(missing))
