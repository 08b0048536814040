"""The Ray Data plan: manifest -> plan -> read -> encode (one pool per model) -> write -> commit.

Stages are the Ray-free callables of :mod:`pathray.stages`; this module only wires them,
sizes the actor pools, and runs the driver loop that tracks chunk completion per
(slide, model), launches commit tasks, and records statuses, errors and the run report.

Driver memory is bounded by the slides *in flight* (plus the manifest itself): finished
(slide, model) pairs are dropped from the tracker, and status/error rows are flushed to
the store every :data:`FLUSH_ROWS` rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pathray import __version__
from pathray.commit import CommitPool, committer_count
from pathray.config import JobConfig, fingerprint, model_record, tiling_record
from pathray.encoders import get_spec, load_encoder
from pathray.errors import StoreConfigMismatchError, UnknownModelError, describe
from pathray.lease import StoreLease
from pathray.manifest import read_manifest
from pathray.stages import SLIDE_SCHEMA, ChunkEncoder, ChunkReader, ChunkWriter, SlidePlanner
from pathray.store import ERROR_SCHEMA, SLIDE_STATUS_SCHEMA, FeatureStore, consolidate_slide_table, status_row

log = logging.getLogger("pathray")

FLUSH_ROWS = 1000
PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class CustomEncoder:
    """An encoder supplied from Python instead of the registry (own backbones, tests,
    benchmarks). ``factory()`` runs once per actor and returns an object with
    ``__call__(uint8 NHWC) -> (N, D)``, ``embed_dim`` and ``provenance()``; ``record`` is the
    JSON-able identity stored in the store config (its fingerprint guards store versions)."""

    factory: Callable[[], Any]
    record: dict[str, Any]
    output_dtype: str = "float32"


@dataclass
class Resources:
    """Resolved resource plan (what :func:`plan_resources` decided)."""

    readers: int
    reader_num_cpus: float
    encoder_actors: int
    encoder_actors_min: int
    encoder_num_gpus: float
    encoder_num_cpus: float
    #: torch intra-op threads per encoder actor: its CPU share rounded up (Ray would leave torch
    #: at OMP_NUM_THREADS=1 for a fractional actor; the planner's and writer's reservations are
    #: idle most of a run, so the encoder uses them)
    encoder_threads: int
    planners: int
    plan_num_cpus: float
    writers: int
    write_num_cpus: float


def plan_resources(config: JobConfig, cluster: dict[str, float], n_models: int) -> Resources:
    """Size the pools from the cluster's CPUs/GPUs unless the config pins them.

    With GPUs: each model gets one actor per GPU at ``1/n_models`` GPU each (models share
    GPUs), one CPU per GPU feeds the encoders, and reader actors (1 CPU each) take the
    CPUs left after the planner and writer pools (one small actor per 32 CPUs each).
    Without GPUs (laptop, CI): readers get an eighth of the CPUs left after the planner and
    writer pools (at least 0.25, at most 1 CPU each), encoders the rest, all fractional so
    nothing deadlocks on a 2-CPU machine; each encoder runs ``encoder_threads`` torch threads
    (2 CPUs: 0.25 + 0.25 plan/write, 0.25 reader, 1.25 encoder -> 2 threads). Every actor pool's maximum is
    reserved, so autoscaling can never starve another stage.

    Derived sizes use the resources present when the job starts. On an autoscaling cluster
    that starts without GPU nodes, set ``encoder_num_gpus`` (GPU actors are then requested
    and the autoscaler adds GPU nodes), ``encoder_actors`` and ``readers`` explicitly;
    ``encoder_actors_min`` lets encoding start on the first GPU node.
    """
    r = config.resources
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    planners = r.planners or max(1, int(cpus // 32))
    writers = r.writers or max(1, int(cpus // 32))
    task_reserve = r.plan_num_cpus * planners + r.write_num_cpus * writers
    if gpus > 0 or (r.encoder_num_gpus or 0) > 0:
        enc_gpus = r.encoder_num_gpus if r.encoder_num_gpus is not None else 1.0 / n_models
        enc_actors = r.encoder_actors or max(1, int(gpus / enc_gpus / n_models))
        enc_cpus = r.encoder_num_cpus if r.encoder_num_cpus is not None else min(1.0, max(cpus - task_reserve, 0.5) / (enc_actors * n_models * 2))
        reader_cpus = r.reader_num_cpus or 1.0
    else:
        enc_gpus = r.encoder_num_gpus or 0.0
        enc_actors = r.encoder_actors or 1
        budget = max(cpus - task_reserve, 0.5)
        # on CPUs the model is the slow stage by ~50x (decode: ~500-2,000 tiles/s/core; ViT-S:
        # ~8 tiles/s/core): readers get an eighth of the budget (0.25-1 CPU each), encoders the rest
        reader_cpus = r.reader_num_cpus or min(1.0, max(0.25, budget / 8))
        enc_cpus = (r.encoder_num_cpus if r.encoder_num_cpus is not None
                    else max(budget - reader_cpus, 0.25) / (enc_actors * n_models))
    left = cpus - task_reserve - enc_cpus * enc_actors * n_models
    readers = r.readers or max(1, int(left / reader_cpus + 1e-9))
    return Resources(readers=readers, reader_num_cpus=reader_cpus, encoder_actors=enc_actors,
                     encoder_actors_min=min(r.encoder_actors_min or enc_actors, enc_actors), encoder_num_gpus=enc_gpus,
                     encoder_num_cpus=enc_cpus, encoder_threads=max(1, math.ceil(enc_cpus - 1e-9)),
                     planners=planners, plan_num_cpus=r.plan_num_cpus, writers=writers,
                     write_num_cpus=r.write_num_cpus)


@dataclass
class RunReport:
    """What a run did; saved as ``_runs/<run_id>/report.json`` and printed at the end."""

    run_id: str
    store: str
    started_at: float
    ended_at: float = 0.0
    #: per model, [start of its first encode call, end of its last], unix seconds
    encode_window: dict[str, list[float]] = field(default_factory=dict)
    slides_in_manifest: int = 0
    slides_skipped: int = 0  # every requested model already committed
    pairs_to_do: int = 0  # (slide, model) pairs this run set out to do
    committed_before: dict[str, int] = field(default_factory=dict)  # per model: slides already committed
    chunks_done: int = 0  # chunk rows the driver has seen (progress)
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)  # ok / no_tissue / error / tiles
    tiles_planned: int = 0
    tiles_read: int = 0
    errors: int = 0
    busy_s: dict[str, float] = field(default_factory=dict)  # summed per stage over all workers
    aborted: str | None = None  # why the run stopped early (then re-running resumes it)
    resources: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.ended_at - self.started_at

    @property
    def steady_tiles_per_s(self) -> float:
        """Tiles per second while the encoders worked: tiles read / the longest per-model window
        from the first encode call's start to the last one's end (start-up, model loading and
        the commit tail excluded)."""
        spans = [end - start for start, end in self.encode_window.values() if end > start]
        return self.tiles_read / max(spans) if spans else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every slide ended ok or without tissue, 1 when any error was recorded."""
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["wall_s"] = self.wall_s
        d["tiles_per_s"] = self.tiles_read / self.wall_s if self.wall_s > 0 else 0.0
        d["steady_tiles_per_s"] = self.steady_tiles_per_s
        d["tiles_per_busy_s"] = {k: (self.tiles_read / v if v > 0 else None) for k, v in self.busy_s.items()}
        d["exit_code"] = self.exit_code
        return d

    def summary(self) -> str:
        before = sum(self.committed_before.values())
        lines = [f"pathray run {self.run_id}: {self.wall_s:.1f} s, store {self.store}",
                 f"  slides: {self.slides_in_manifest} in manifest, {self.slides_skipped} with every model already "
                 f"committed; (slide, model) pairs: {self.pairs_to_do} to do, {before} already committed",
                 f"  tiles: {self.tiles_planned} planned, {self.tiles_read} read"
                 + (f" ({self.tiles_read / self.wall_s:.1f} tiles/s)" if self.wall_s > 0 else "")]
        for model, counts in self.per_model.items():
            lines.append(f"  {model}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                         + f", already committed {self.committed_before.get(model, 0)}")
        lines.append(f"  errors recorded: {self.errors}")
        return "\n".join(lines)


class _Ledger:
    """Buffers status and error rows; flushes them to the store in parts."""

    def __init__(self, store: FeatureStore, run_id: str):
        self.store, self.run_id = store, run_id
        self.status: list[dict] = []
        self.errors: list[dict] = []
        self.parts = 0

    def record(self, row: dict, error_stage: str | None = None) -> None:
        self.status.append(row)
        if row["status"] == "error":
            self.errors.append({"slide_id": row["slide_id"], "model": row["model"], "stage": error_stage or row["stage"],
                                "error_type": row["error_type"], "message": row["error_message"], "time": time.time()})
        if len(self.status) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.status and not self.errors:
            return
        self.parts += 1
        if self.status:
            self.store.write_table(f"_runs/{self.run_id}/slides-{self.parts:05d}.parquet",
                                   pa.Table.from_pylist(self.status, schema=SLIDE_STATUS_SCHEMA))
        if self.errors:
            self.store.write_table(f"errors/run_id={self.run_id}/part-{self.parts:05d}.parquet",
                                   pa.Table.from_pylist(self.errors, schema=ERROR_SCHEMA))
        self.status, self.errors = [], []


def _resolve_models(config: JobConfig, custom: dict[str, CustomEncoder]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split requested models into usable ones and (name, message) for unknown names."""
    usable, unknown = [], []
    for name in config.models:
        if name in custom:
            usable.append(name)
            continue
        try:
            get_spec(name)
            usable.append(name)
        except UnknownModelError as exc:
            unknown.append((name, str(exc)))
    return usable, unknown


def _choose_store(config: JobConfig, tiling_rec: dict, model_recs: dict[str, dict]) -> FeatureStore:
    """The store this run writes: ``out``, or with ``new_version`` and a config mismatch,
    ``out/versions/<hash>``. Only reads; raises :class:`StoreConfigMismatchError` otherwise."""
    store = FeatureStore(config.out, config.storage_options)
    try:
        store.check_config(tiling_rec, model_recs)
        return store
    except StoreConfigMismatchError:
        if not config.new_version:
            raise
    version = fingerprint({"tiling": tiling_rec["fingerprint"], "models": sorted(r["fingerprint"] for r in model_recs.values())})
    store = FeatureStore(f"{config.out.rstrip('/')}/versions/{version}", config.storage_options)
    store.check_config(tiling_rec, model_recs)
    return store


def _passthrough_schema(entries, keep: tuple[str, ...]) -> pa.Schema:
    if not keep:
        return pa.schema([])
    schema = pa.Table.from_pylist([{c: e.extra.get(c) for c in keep} for e in entries]).schema
    return pa.schema([pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in schema])


def run_job(config: JobConfig, custom_encoders: dict[str, CustomEncoder] | None = None,
            progress_bars: bool = True) -> RunReport:
    """Run one embedding job end to end and return its report (also saved in the store).

    Per-slide failures never raise: they end as error rows and a non-zero
    :attr:`RunReport.exit_code`. Raised: an unusable manifest (:class:`ManifestError`), a
    config mismatch with the existing store (:class:`StoreConfigMismatchError`), or no
    usable model at all (:class:`UnknownModelError`)."""
    custom = dict(custom_encoders or {})
    run_id = config.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    report = RunReport(run_id=run_id, store=config.out, started_at=time.time(), config=config.public_dict())
    models, unknown = _resolve_models(config, custom)
    if not models:
        raise UnknownModelError("; ".join(msg for _, msg in unknown))
    entries = read_manifest(config.manifest, config.storage_options)
    report.slides_in_manifest = len(entries)

    tiling_rec = tiling_record(config.tiling)
    model_recs = {m: ({**custom[m].record, "fingerprint": fingerprint(custom[m].record)} if m in custom
                      else model_record(m, config.encoders[m])) for m in models}
    store = _choose_store(config, tiling_rec, model_recs)
    if store.root != config.out.rstrip("/"):
        log.warning("config differs from %s: writing store version %s", config.out, store.root)
    report.store = store.root
    with StoreLease(store, run_id) as lease:
        if lease.took_over is not None:
            log.warning("took over the lease of %s: its holder stopped heart-beating", lease.took_over.describe())
        store_cfg = store.ensure_config(tiling_rec, model_recs)
        store.remove_temporaries()
        return _run_locked(config, models, unknown, entries, custom, store, fingerprint(store_cfg), report,
                           progress_bars)


def _run_locked(config: JobConfig, models: list[str], unknown: list[tuple[str, str]], entries, custom, store,
                store_hash: str, report: RunReport, progress_bars: bool) -> RunReport:
    """The body of :func:`run_job` once the store's lease is held."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    run_id = report.run_id
    ledger = _Ledger(store, run_id)
    for name, message in unknown:  # recorded once per slide, like any other per-slide failure
        for e in entries:
            ledger.record(status_row(slide_id=e.slide_id, model=name, path=e.path, cohort=e.cohort, status="error",
                                     stage="config", error_type=UnknownModelError.error_type, error_message=message,
                                     run_id=run_id))
    report.per_model = {m: {"ok": 0, "no_tissue": 0, "error": 0, "tiles": 0} for m in models}
    for name, _ in unknown:
        report.per_model[name] = {"ok": 0, "no_tissue": 0, "error": len(entries), "tiles": 0}
    report.errors += len(unknown) * len(entries)

    committed = {m: store.committed(m) for m in models}
    report.committed_before = {m: sum(e.slide_id in committed[m] for e in entries) for m in models}
    todo = []
    for e in entries:
        need = [m for m in models if e.slide_id not in committed[m]]
        if need:
            todo.append({"slide_id": e.slide_id, "path": e.path, "cohort": e.cohort or "",
                         "mpp_override": math.nan if e.mpp is None else float(e.mpp), "models": need})
    report.slides_skipped = len(entries) - len(todo)
    report.pairs_to_do = sum(len(t["models"]) for t in todo)
    by_id = {e.slide_id: e for e in entries}
    passthrough_schema = _passthrough_schema(entries, config.keep_columns)
    tiling_rec = tiling_record(config.tiling)

    if todo:
        if not ray.is_initialized():
            ray.init(address=config.ray_address)
        res = plan_resources(config, ray.cluster_resources(), len(models))
        report.resources = dataclasses.asdict(res)
        log.info("resources: %s", report.resources)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = progress_bars
        ctx.execution_options.preserve_order = False
        ctx.print_on_execution_start = False
        # Ray Data's per-30-s "operator uses N GiB per worker" warning fires for every model
        # actor (its memory is the model's, held on purpose); the run reports its own progress
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
        ctx.scheduling_strategy = "DEFAULT"  # not SPREAD: Ray then keeps CPU-only actors off GPU nodes while it can
        if config.resources.object_store_limit_gb:
            ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
                object_store_memory=int(config.resources.object_store_limit_gb * 2**30))

        ds = _build_dataset(config, store.root, models, custom, res, todo, ActorPoolStrategy)
        try:
            _drive(ray, ds, config, models, store, store_hash, run_id, ledger, report, by_id, passthrough_schema,
                   tiling_rec)
        except BaseException as exc:  # Ray failure, timeout, Ctrl-C: keep what is known, then re-raise
            report.aborted = f"{type(exc).__name__}: {exc}"[:2000]
            _close_run(store, models, ledger, report)
            raise
    return _close_run(store, models, ledger, report)


def _close_run(store: FeatureStore, models: list[str], ledger: _Ledger, report: RunReport) -> RunReport:
    """Flush status/error rows, rebuild slides.parquet, save the run report."""
    ledger.flush()
    consolidate_slide_table(store, {m: store.committed(m) for m in models})
    report.ended_at = time.time()
    store.write_json(f"_runs/{report.run_id}/report.json", report.to_dict())
    return report


def _build_dataset(config: JobConfig, store_root: str, models: list[str], custom: dict[str, CustomEncoder],
                   res: Resources, todo: list[dict], ActorPoolStrategy):
    import ray

    table = pa.Table.from_pylist(todo, schema=SLIDE_SCHEMA)
    per_block = max(1, min(16, len(todo) // (8 * res.readers) or 1))
    ds = ray.data.from_arrow([table.slice(i, per_block) for i in range(0, len(todo), per_block)])
    staging = dict(storage_options=config.storage_options, scratch_dir=config.scratch_dir,
                   scratch_max_bytes=config.scratch_max_bytes)
    ds = ds.map_batches(SlidePlanner, batch_size=1, batch_format="pyarrow", num_cpus=res.plan_num_cpus,
                        compute=ActorPoolStrategy(min_size=1, max_size=res.planners),
                        fn_constructor_kwargs=dict(tiling=config.tiling, chunk_tiles=config.chunk_tiles, **staging))
    ds = ds.map_batches(ChunkReader, batch_size=1, batch_format="pyarrow", num_cpus=res.reader_num_cpus,
                        compute=ActorPoolStrategy(min_size=1, max_size=res.readers),
                        fn_constructor_kwargs=dict(tiling=config.tiling, **staging))
    for i, model in enumerate(models):
        make = custom[model].factory if model in custom else partial(load_encoder, config.encoders[model])
        ds = ds.map_batches(ChunkEncoder, batch_size=config.resources.chunks_per_encode_call, batch_format="pyarrow",
                            num_cpus=res.encoder_num_cpus, num_gpus=res.encoder_num_gpus,
                            compute=ActorPoolStrategy(min_size=res.encoder_actors_min, max_size=res.encoder_actors),
                            fn_constructor_kwargs=dict(model=model, make_encoder=make, tile_px=config.tiling.tile_px,
                                                       drop_pixels=i == len(models) - 1,
                                                       threads=res.encoder_threads))
    types = {m: (custom[m].output_dtype if m in custom else config.encoders[m].output_dtype) for m in models}
    return ds.map_batches(ChunkWriter, batch_size=1, batch_format="pyarrow", num_cpus=res.write_num_cpus,
                          compute=ActorPoolStrategy(min_size=1, max_size=res.writers),
                          fn_constructor_kwargs=dict(root=store_root, storage_options=config.storage_options, models=models,
                                         tiling=config.tiling, embedding_types=types))


@dataclass
class _Pending:
    """Chunks of one (slide, model) seen so far by the driver."""

    n_chunks: int
    chunk_ids: dict[int, str] = field(default_factory=dict)  # chunk_index -> chunk_id, staged ok
    seen: set[int] = field(default_factory=set)  # chunk indices accounted for (ok or error)
    failed: bool = False

    def complete(self) -> bool:
        return len(self.seen) >= max(self.n_chunks, 1)


def _drive(ray, ds, config, models, store, store_hash, run_id, ledger, report, by_id, passthrough_schema,
           tiling_rec) -> None:
    """Consume result rows, commit finished (slide, model) pairs, record everything."""
    per_committer = config.resources.max_inflight_finalize
    committers = CommitPool(ray, store, committer_count(config.resources.committers, ray.cluster_resources()),
                            max_concurrency=per_committer)
    report.resources["committers"] = len(committers)
    pending: dict[tuple[str, str], _Pending] = {}
    inflight: dict[Any, dict] = {}
    provenance: dict[str, dict] = {}
    busy = {"plan": 0.0, "read": 0.0, "write": 0.0, **{f"encode:{m}": 0.0 for m in models}}
    last_log = time.time()

    def settle(block: bool) -> None:
        """Collect finished commits; keep at most max_inflight_finalize per committer in flight."""
        while inflight and (block or len(inflight) >= per_committer * len(committers)):
            done, _ = ray.wait(list(inflight), num_returns=1)
            row = inflight.pop(done[0])
            try:
                ray.get(done[0])
                report.per_model[row["model"]][row["status"]] += 1
                report.per_model[row["model"]]["tiles"] += row["n_tiles"]
                ledger.record(row)
            except Exception as exc:
                report.per_model[row["model"]]["error"] += 1
                report.errors += 1
                error_type, message = describe(exc)
                ledger.record(dict(row, status="error", stage="finalize", error_type=error_type,
                                   error_message=message[:2000]))

    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in batch.to_pylist():
            model, key = r["model"], (r["slide_id"], r["model"])
            busy["write"] += r["write_s"]
            busy[f"encode:{model}"] += r["encode_s"]
            if r["encoded_at"]:
                window = report.encode_window.setdefault(model, [math.inf, 0.0])
                window[0] = min(window[0], r["encoded_at"] - r["encode_s"])
                window[1] = max(window[1], r["encoded_at"])
            if r["first"]:  # chunk-level figures are carried by the chunk's first model row only
                busy["plan"] += r["plan_s"]
                busy["read"] += r["read_s"]
                report.tiles_read += r["tiles_read"]
                if r["chunk_index"] == 0:
                    report.tiles_planned += r["n_tiles_slide"]
            if r["provenance"] != "{}":
                provenance.setdefault(model, json.loads(r["provenance"]))
            report.chunks_done += 1
            state = pending.setdefault(key, _Pending(n_chunks=r["n_chunks"]))
            state.seen.add(r["chunk_index"])
            first_error = r["status"] == "error" and not state.failed
            if r["status"] == "ok":
                state.chunk_ids[r["chunk_index"]] = r["chunk_id"]
            state.failed = state.failed or r["status"] == "error"
            if not first_error and not state.complete():
                continue  # the per-row hot path: nothing to record yet
            if state.complete():
                del pending[key]
            if state.failed and not first_error:  # staged chunks stay; a re-run overwrites them
                continue
            entry = by_id[r["slide_id"]]
            meta = json.loads(r["slide_meta"])
            base = status_row(slide_id=r["slide_id"], model=model, path=entry.path, cohort=entry.cohort,
                              width=meta.get("width"), height=meta.get("height"), mpp=meta.get("mpp"),
                              mpp_source=meta.get("mpp_source"), vendor=meta.get("vendor"), run_id=run_id,
                              n_tiles=r["n_tiles_slide"])
            if first_error:
                report.per_model[model]["error"] += 1
                report.errors += 1
                ledger.record(dict(base, status="error", stage=r["stage"], error_type=r["error_type"],
                                   error_message=r["error_message"]))
                continue
            chunk_ids = [state.chunk_ids[i] for i in sorted(state.chunk_ids)]
            prov = {"model": provenance.get(model, {}), "tiling": tiling_rec, "run_id": run_id,
                    "pathray_version": __version__, "store_config_hash": store_hash}
            slide_meta = {k: meta.get(k) for k in ("path", "width", "height", "mpp", "mpp_source", "vendor", "etag",
                                                   "size_bytes")}
            ref = committers.submit(model, r["slide_id"], entry.cohort, chunk_ids, r["n_tiles_slide"], slide_meta,
                                    prov, store_hash, run_id, {c: entry.extra.get(c) for c in config.keep_columns},
                                    passthrough_schema)
            inflight[ref] = dict(base, status="ok" if r["n_tiles_slide"] else "no_tissue")
            settle(block=False)
        if time.time() - last_log > PROGRESS_EVERY_S:
            last_log = time.time()
            done = {m: c["ok"] + c["no_tissue"] + c["error"] for m, c in report.per_model.items()}
            log.info("progress: %d (chunk, model) results, %d tiles read; (slide, model) pairs done %s of %d, "
                     "%d in flight", report.chunks_done, report.tiles_read, done, report.pairs_to_do, len(pending))
    settle(block=True)
    report.busy_s = busy


def dry_run_plan(config: JobConfig, sample: int = 8) -> dict[str, Any]:
    """What a run would do, without starting Ray: slides to do / already committed,
    tiles estimated by planning up to ``sample`` slides, and the resource plan for the
    local machine (or the cluster at ``RAY_ADDRESS`` once the job runs there). Checks the
    store's config as the run would: a mismatch the run would refuse raises
    :class:`StoreConfigMismatchError` here too (with ``new_version``, the plan names the
    version it would write)."""
    from pathray.stages import SlidePlanner

    models, unknown = _resolve_models(config, {})
    entries = read_manifest(config.manifest, config.storage_options)
    store = _choose_store(config, tiling_record(config.tiling), {m: model_record(m, config.encoders[m]) for m in models})
    existing = store.read_config()
    committed = {m: store.committed(m) for m in models}
    todo = [e for e in entries if any(e.slide_id not in committed[m] for m in models)]
    planner = SlidePlanner(config.tiling, config.chunk_tiles, config.storage_options, config.scratch_dir,
                           config.scratch_max_bytes)
    counts, errors = [], []
    try:
        for e in todo[:sample]:
            rows = planner.plan_one({"slide_id": e.slide_id, "path": e.path, "cohort": e.cohort or "", "models": models,
                                     "mpp_override": math.nan if e.mpp is None else e.mpp})
            if rows[0]["status"] == "error":
                errors.append({"slide_id": e.slide_id, "error_type": rows[0]["error_type"], "message": rows[0]["error_message"]})
            counts.append(rows[0]["n_tiles_slide"])
    finally:
        planner.scratch.close()
    mean_tiles = float(np.mean(counts)) if counts else 0.0
    cluster = {"CPU": float(os.cpu_count() or 1), "GPU": float(_local_gpus())}
    return {
        "models": models,
        "unknown_models": [name for name, _ in unknown],
        "tiling": config.tiling.to_dict(),
        "store": store.root,
        "store_exists": existing is not None,
        "slides_in_manifest": len(entries),
        "slides_already_committed": len(entries) - len(todo),
        "slides_to_do": len(todo),
        "sampled_slides": len(counts),
        "sample_errors": errors,
        "estimated_tiles": round(mean_tiles * len(todo)),
        "estimated_chunks": round(math.ceil(mean_tiles / config.chunk_tiles) * len(todo)) if mean_tiles else 0,
        "local_resources": cluster,
        "resource_plan_here": dataclasses.asdict(plan_resources(config, cluster, max(1, len(models)))),
    }


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0
