"""`pathray aggregate` as a Ray Data job: committed tile features -> one slide-level row per slide.

Plan: the driver lists the tile model's commit records and the aggregator's, and sends
only slides committed for the tile model and not yet aggregated. Ray Data then runs

1. :func:`load_slides` (CPU tasks): per slide, its tile commit record and its features
   file, read once, checked against the record (row count, order) -> tiles as bytes;
2. :class:`SlideAggregatorStage` (actor pool; one GPU per actor when the aggregator is
   ``accelerated`` and the cluster has GPUs): builds the aggregator once per actor, computes
   each slide's embedding and commits it: the one-row Parquet file
   ``slide_features/model=<m>/aggregator=<a>/<slide_id>.parquet`` (one PUT; locally a
   ``.``-prefixed temp file + ``os.replace``), then its commit record under ``_commits/``.

A slide is aggregated iff its commit record exists; a re-run skips those and redoes the
rest, overwriting any file a crash left without a record. Slides committed without tissue
get a record and no file. Per-slide failures (an unreadable features file, an aggregator
error) become rows of the store's error ledger (``errors/run_id=<run>/``, ``model`` = the
tile model, ``stage`` = ``aggregate:<name>/<load|aggregate|commit>``), never a failed job.
The aggregator's identity (spec + weights) is pinned in
``_commits/slide_features/model=<m>/aggregator=<a>.json``: once a slide is committed, a run
with other weights under the same name is refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pathray import __version__
from pathray.errors import AggregatorError, FeaturesUnreadableError, StoreConfigMismatchError, describe
from pathray.job.config import fingerprint
from pathray.job.localrun import choose_runner
from pathray.job.resources import PLACEMENT
from pathray.monitor.html import MAX_TABLE_ROWS
from pathray.monitor.runlog import log_ray_plan_warnings, new_run_id, quiet_local_ray_env
from pathray.monitor.watch import RunWatch
from pathray.slide_level.aggregators import (
    AggregatorSpec,
    SlideTiles,
    build_aggregator,
    describe_tiling,
    get_aggregator,
)
from pathray.store import (
    ERROR_SCHEMA,
    PROVENANCE_KEY,
    TILE_FIELDS,
    FeatureStore,
    _put_bytes,
    _read_json,
    embeddings_to_arrow,
    model_tiling,
)
from pathray.store.lease import StoreLease

log = logging.getLogger("pathray")

TILE_COLUMNS = frozenset(f.name for f in TILE_FIELDS) | {"embedding"}

LOADED_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("cohort", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("n_tiles", pa.int64()),
        ("dim", pa.int64()),
        ("embeddings", pa.large_binary()),  # (n_tiles, dim) float32, little-endian
        ("x", pa.large_binary()),
        ("y", pa.large_binary()),  # (n_tiles,) int64 level-0 px
        ("slide_mpp", pa.float64()),
        ("kept", pa.large_binary()),  # kept manifest columns: 1-row Arrow IPC stream
        ("tile_provenance", pa.string()),
        ("features_path", pa.string()),
        ("load_s", pa.float64()),
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("n_tiles", pa.int64()),
        ("load_s", pa.float64()),
        ("aggregate_s", pa.float64()),
    ]
)


@dataclass(frozen=True)
class AggregateConfig:
    """One `pathray aggregate` run. ``num_gpus``/``actors`` override the resource plan."""

    store: str
    model: str  # the tile model whose committed features are aggregated
    aggregator: str  # a name in pathray.slide_level.aggregators.AGGREGATORS
    weights: str | None = None  # for aggregators that need weights: file, hub-layout dir or hf-hub:org/name
    storage_options: dict[str, Any] | None = None
    ray_address: str | None = None
    run_id: str | None = None
    num_gpus: float | None = None  # per aggregator actor
    actors: int | None = None
    #: "ray" | "local" (the stages in this process) | "auto": local with no cluster to join and no GPU
    runner: str = "auto"


@dataclass(frozen=True)
class AggregateResources:
    loader_num_cpus: float
    actors: int
    actor_num_cpus: float
    actor_num_gpus: float


def plan_aggregate_resources(
    spec: AggregatorSpec, cluster: dict[str, float], config: AggregateConfig
) -> AggregateResources:
    """Aggregator actors on GPUs (one GPU each, one actor per GPU) when the spec is
    ``accelerated`` and the cluster has GPUs or ``num_gpus`` is set; else on CPUs, sharing
    them half and half with the loaders, fractional so nothing deadlocks on 2 CPUs."""
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    if spec.accelerated and (gpus > 0 or config.num_gpus):
        per_actor = config.num_gpus or 1.0
        actors = config.actors or max(1, int(gpus / per_actor))
        return AggregateResources(
            loader_num_cpus=1.0, actors=actors, actor_num_cpus=min(1.0, cpus / (2 * actors)), actor_num_gpus=per_actor
        )
    actors = config.actors or 1
    return AggregateResources(
        loader_num_cpus=min(1.0, cpus / 2), actors=actors, actor_num_cpus=cpus / 2 / actors, actor_num_gpus=0.0
    )


@dataclass
class AggregateReport:
    """What a run did; saved as ``_runs/<run_id>/report.json``."""

    run_id: str
    store: str
    model: str
    aggregator: str
    started_at: float
    ended_at: float = 0.0
    slides_committed: int = 0  # committed for the tile model when the run started
    slides_skipped: int = 0  # already aggregated
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "no_tissue": 0, "error": 0})
    tiles: int = 0
    busy_s: dict[str, float] = field(default_factory=lambda: {"load": 0.0, "aggregate": 0.0})
    resources: dict[str, Any] = field(default_factory=dict)
    aborted: str | None = None
    runner: str = ""  # "ray" | "local" (pathray.job.localrun.choose_runner), "" when nothing was to do
    html: str = ""  # the run's report.html, once written

    @property
    def exit_code(self) -> int:
        """0 when every slide was aggregated (or had no tissue), 1 when any error was recorded."""
        return 1 if self.counts["error"] else 0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "wall_s": self.ended_at - self.started_at, "exit_code": self.exit_code}

    def summary(self) -> str:
        return (
            f"pathray aggregate {self.run_id}: {self.model} -> {self.aggregator}, "
            f"{self.ended_at - self.started_at:.1f} s, store {self.store}\n"
            f"  slides: {self.slides_committed} committed, {self.slides_skipped} already aggregated; "
            + ", ".join(f"{k} {v}" for k, v in self.counts.items())
            + f"; {self.tiles} tiles read"
        )


# --- stage 1: load ----------------------------------------------------------------------------
def load_slides(batch: pa.Table, root: str, storage_options: dict | None, model: str) -> pa.Table:
    """Slide ids -> :data:`LOADED_SCHEMA` rows; a slide that cannot be read is an error row."""
    store = FeatureStore(root, storage_options)
    return pa.Table.from_pylist(
        [_load_one(store, model, s) for s in batch.column("slide_id").to_pylist()], schema=LOADED_SCHEMA
    )


def _load_one(store: FeatureStore, model: str, slide_id: str) -> dict[str, Any]:
    start = time.perf_counter()
    row = {name: None for name in LOADED_SCHEMA.names}
    row.update(slide_id=slide_id, status="ok", n_tiles=0, dim=0)
    try:
        record = store.commit_record(model, slide_id)
        if record is None:
            raise FeaturesUnreadableError(f"{slide_id}: the commit record of model {model!r} disappeared")
        row.update(cohort=record.cohort, features_path=record.features_path)
        if record.features_path is None:
            row["status"] = "no_tissue"
        else:
            row.update(_read_tiles(store, record.features_path, record.n_tiles, record.slide.get("mpp")))
    except Exception as exc:  # noqa: BLE001 - one slide's failure is recorded, never fatal
        error_type, message = describe(exc)
        row.update(status="error", stage="load", error_type=error_type, error_message=message[:2000])
    row["load_s"] = time.perf_counter() - start
    return row


def _read_tiles(store: FeatureStore, relpath: str, n_tiles: int, slide_mpp: float | None) -> dict[str, Any]:
    """The one read of a slide's features file, checked against its commit record."""
    try:
        with store.fs.open(store.path(relpath), "rb") as f:
            table = pq.read_table(f)
    except FileNotFoundError as exc:
        raise FeaturesUnreadableError(f"{relpath}: committed but missing ({exc})") from exc
    except (pa.ArrowException, OSError) as exc:
        raise FeaturesUnreadableError(f"{relpath}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
    if table.num_rows != n_tiles or "embedding" not in table.column_names:
        raise FeaturesUnreadableError(f"{relpath}: {table.num_rows} rows, its commit record says {n_tiles}")
    if not np.all(np.diff(table.column("tile_index").to_numpy()) > 0):
        raise FeaturesUnreadableError(f"{relpath}: tile_index is not strictly increasing")
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    embeddings = emb.flatten().to_numpy(zero_copy_only=False).reshape(n_tiles, dim).astype("<f4", copy=False)
    kept = table.select([c for c in table.column_names if c not in TILE_COLUMNS]).slice(0, 1)
    if slide_mpp is None:  # size_level0 = tile_px * target_mpp / slide_mpp
        first = table.slice(0, 1).to_pylist()[0]
        slide_mpp = first["tile_px"] * first["target_mpp"] / first["size_level0"]
    meta = table.schema.metadata or {}
    return {
        "n_tiles": n_tiles,
        "dim": dim,
        "embeddings": embeddings.tobytes(),
        "x": table.column("x").to_numpy().astype("<i8").tobytes(),
        "y": table.column("y").to_numpy().astype("<i8").tobytes(),
        "slide_mpp": float(slide_mpp),
        "kept": _ipc_bytes(kept) if kept.num_columns else b"",
        "tile_provenance": meta.get(PROVENANCE_KEY, b"{}").decode(),
    }


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


# --- stage 2: aggregate + commit --------------------------------------------------------------
class SlideAggregatorStage:
    """Loaded slides -> :data:`RESULT_SCHEMA` rows, committing each slide's row.

    The aggregator is built once per actor. If that fails (weights missing, module absent),
    the actor stays up and every slide it receives becomes an error row with that cause
    (stage ``aggregate``, the build error's ``error_type``)."""

    def __init__(self, config: AggregateConfig, spec: AggregatorSpec, device: str, base_provenance: dict[str, Any]):
        self.store = FeatureStore(config.store, config.storage_options)
        self.model, self.spec = config.model, spec
        self.aggregator, self.build_error = None, None
        try:
            self.aggregator = build_aggregator(spec, config.weights, device)
            self.provenance = {**base_provenance, "aggregator_provenance": self.aggregator.provenance()}
        except Exception as exc:  # noqa: BLE001 - reported on every slide this actor receives
            self.build_error = describe(exc)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self._one(row) for row in batch.to_pylist()], schema=RESULT_SCHEMA)

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        result = {
            k: row[k] for k in ("slide_id", "status", "stage", "error_type", "error_message", "n_tiles", "load_s")
        }
        result["aggregate_s"] = 0.0
        if row["status"] == "error":
            return result
        if self.build_error:
            error_type, message = self.build_error
            result.update(
                status="error",
                stage="aggregate",
                error_type=error_type,
                error_message=f"{self.spec.name} could not be built: {message}"[:2000],
            )
            return result
        start, stage = time.perf_counter(), "aggregate"
        try:
            table = self._slide_row(row) if row["status"] == "ok" else None
            stage = "commit"
            self._commit(row, table)
        except Exception as exc:  # noqa: BLE001 - one slide's failure is recorded, never fatal
            error_type, message = describe(exc)
            result.update(status="error", stage=stage, error_type=error_type, error_message=message[:2000])
        result["aggregate_s"] = time.perf_counter() - start
        return result

    def _slide_row(self, row: dict[str, Any]) -> pa.Table:
        n, dim = row["n_tiles"], row["dim"]
        tiles = SlideTiles(
            row["slide_id"],
            np.frombuffer(row["embeddings"], "<f4").reshape(n, dim),
            np.frombuffer(row["x"], "<i8"),
            np.frombuffer(row["y"], "<i8"),
            row["slide_mpp"],
        )
        vector = self.aggregator(tiles)
        want = self.spec.out_dim(dim)
        if vector.shape != (want,) or not np.all(np.isfinite(vector)):
            raise AggregatorError(
                f"{self.spec.name} returned shape {vector.shape} (finite: "
                f"{bool(np.all(np.isfinite(vector)))}), expected ({want},) finite"
            )
        table = pa.table(
            {
                "slide_id": pa.array([row["slide_id"]]),
                "cohort": pa.array([row["cohort"]]),
                "n_tiles": pa.array([n], pa.int64()),
                "embedding": embeddings_to_arrow(vector[None, :]),
            }
        )
        if row["kept"]:
            kept = pa.ipc.open_stream(row["kept"]).read_all()
            for name in kept.column_names:
                table = table.append_column(kept.schema.field(name), kept.column(name))
        provenance = {
            **self.provenance,
            "source": {"features_path": row["features_path"], "n_tiles": n},
            "tile_provenance": json.loads(row["tile_provenance"] or "{}"),
        }
        return table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True, default=str)})

    def _commit(self, row: dict[str, Any], table: pa.Table | None) -> None:
        """The slide's file first (if it has tiles), its commit record last."""
        relpath = None
        if table is not None:
            relpath = self.store.slide_features_relpath(self.model, self.spec.name, row["slide_id"])
            self.store.write_table(relpath, table)
        self.store.write_json(
            self.store.slide_commit_relpath(self.model, self.spec.name, row["slide_id"]),
            {
                "slide_id": row["slide_id"],
                "model": self.model,
                "aggregator": self.spec.name,
                "cohort": row["cohort"],
                "n_tiles": row["n_tiles"],
                "slide_features_path": relpath,
                "features_path": row["features_path"],
                "aggregator_fingerprint": self.provenance["aggregator"]["fingerprint"],
                "run_id": self.provenance["run_id"],
            },
        )


# --- driver -----------------------------------------------------------------------------------
def _pin_aggregator(
    store: FeatureStore, model: str, spec: AggregatorSpec, weights: str | None, done: set[str]
) -> dict[str, Any]:
    """Write or check the aggregator identity (spec + weights) of this output folder. Other
    weights are refused once any slide (``done``) is committed under it; until then the new
    identity replaces the old (a first run whose weights could not be loaded commits nothing)."""
    record = spec.record(weights)
    record["fingerprint"] = fingerprint(record)
    path = store.path(store.slide_commit_relpath(model, spec.name) + ".json")  # beside the records, not among them
    existing = _read_json(store.fs, path)
    if existing is None or (existing["fingerprint"] != record["fingerprint"] and not done):
        _put_bytes(store.fs, path, json.dumps(record, indent=2, sort_keys=True).encode())
    elif existing["fingerprint"] != record["fingerprint"]:
        raise StoreConfigMismatchError(
            f"slide_features for {model}/{spec.name} in {store.root} were made with "
            f"{json.dumps({k: existing.get(k) for k in ('weights', 'builder')})}; this run uses "
            f"{json.dumps({k: record[k] for k in ('weights', 'builder')})}"
        )
    return record


def _check_inputs(store: FeatureStore, config: AggregateConfig, spec: AggregatorSpec) -> None:
    """Refuse a run that cannot produce meaningful rows, before any work starts: a tile model
    the aggregator was not trained on, a store tiled otherwise than it needs, a model not in
    the store. The message gives the ``pathray embed`` command that writes what it needs (into
    this store unless the model is already there at another tiling: a store holds each model at
    one tiling)."""
    current = store.read_config() or {}
    models, tiling = current.get("models", {}), model_tiling(current, config.model)
    tiling_ok = spec.tiles is None or not tiling or spec.tiles.matches(tiling)
    fix = f"; make them with: {spec.embed_command(store.root if tiling_ok or config.model not in models else 'NEW_STORE')}"
    if spec.tile_models and config.model not in spec.tile_models:
        raise ValueError(
            f"aggregator {spec.name!r} takes embeddings of {', '.join(spec.tile_models)}, not {config.model!r}{fix}"
        )
    if not tiling_ok:
        raise ValueError(
            f"aggregator {spec.name!r} needs {spec.tiles.describe()}; {store.root} holds {describe_tiling(tiling)}{fix}"
        )
    if config.model not in models:
        raise ValueError(
            f"model {config.model!r} is not in the store {store.root} (has: "
            f"{', '.join(sorted(models)) or 'none'}){fix if spec.tile_models else ''}"
        )
    if spec.needs_weights and not config.weights:
        log.info("%s: no --weights given; the aggregator's default source is used", spec.name)


def _errors_table(failed: list[dict[str, Any]], model: str, aggregator: str) -> pa.Table:
    rows = [
        {
            "slide_id": r["slide_id"],
            "model": model,
            "stage": f"aggregate:{aggregator}/{r['stage']}",
            "error_type": r["error_type"],
            "message": r["error_message"],
            "time": time.time(),
        }
        for r in failed
    ]
    return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


def run_aggregate(
    config: AggregateConfig, progress_bars: bool = True, display: TextIO | None = None
) -> AggregateReport:
    """Aggregate every committed, not yet aggregated slide of ``config.model``; return the
    report (also saved in the store, with ``report.html``; ``progress_bars``: Ray's output,
    ``display``: the live progress's stream). Per-slide failures never raise: error rows
    and a non-zero :attr:`AggregateReport.exit_code`. Raised: an unknown aggregator or tile
    model, a tile model the aggregator does not take or a store tiled otherwise than it needs
    (``ValueError``, naming the ``pathray embed`` command that would fit), other weights than
    the folder was made with (:class:`StoreConfigMismatchError`), another live driver on the
    store (:class:`StoreBusyError`: the run takes the store's lease as ``pathray embed``
    does), a lease lost mid-run (:class:`LeaseLostError`)."""
    spec = get_aggregator(config.aggregator)
    store = FeatureStore(config.store, config.storage_options)
    _check_inputs(store, config, spec)
    run_id = config.run_id or new_run_id("agg-")
    report = AggregateReport(
        run_id=run_id, store=store.root, model=config.model, aggregator=spec.name, started_at=time.time()
    )
    with StoreLease(store, run_id) as lease:
        return _aggregate_locked(config, spec, store, report, lease, (progress_bars, display))


def _aggregate_locked(
    config: AggregateConfig,
    spec: AggregatorSpec,
    store: FeatureStore,
    report: AggregateReport,
    lease: StoreLease,
    output: tuple[bool, TextIO | None],
) -> AggregateReport:
    """The body of :func:`run_aggregate` once the store's lease is held; the lease is checked
    for every result (commits happen in the actors: a lost lease stops the run at once).
    ``output``: (Ray's progress bars, the live display's stream)."""
    progress_bars, display = output
    committed, done = store.committed(config.model), store.aggregated(config.model, spec.name)
    record = _pin_aggregator(store, config.model, spec, config.weights, done)
    todo = sorted(committed - done)
    report.slides_committed, report.slides_skipped = len(committed), len(committed) - len(todo)
    failed, shown = [], []  # error rows; the page's per-slide rows
    watch = RunWatch({spec.name: len(todo)}, display, read_stage="load")
    try:
        if todo:
            provenance = {
                "aggregator": record,
                "tile_model": config.model,
                "run_id": report.run_id,
                "pathray_version": __version__,
                "store_config_hash": fingerprint(store.read_config()),
            }
            report.runner = choose_runner(config)
            rows = (
                _run_local(config, spec, store, todo, provenance)
                if report.runner == "local"
                else _run_dataset(config, spec, store, todo, provenance, report, progress_bars)
            )
            for r in rows:
                lease.ensure_held()
                failed += [r] if r["status"] == "error" else []
                _count(r, report, watch)
                shown += [dict(r, model=spec.name)] if len(shown) < MAX_TABLE_ROWS else []
    except BaseException as exc:  # Ray failure, Ctrl-C: keep what is known (a re-run resumes), then re-raise
        report.aborted = f"{type(exc).__name__}: {exc}"[:2000]
        raise
    finally:
        watch.close()
        if lease.lost is None:  # a lost store may be another driver's now: leave it alone
            errors = _errors_table(failed, config.model, spec.name)
            if errors.num_rows:
                store.write_table(store.errors_relpath(report.run_id, 1), errors)
            report.ended_at = time.time()
            store.write_json(store.report_relpath(report.run_id), report.to_dict())
            _write_page(store, report, shown, watch)
    return report


def _count(r: dict[str, Any], report: AggregateReport, watch: RunWatch) -> None:
    """One slide's result row into the report and the live progress."""
    tiles = r["n_tiles"] if r["status"] != "error" else 0
    report.counts[r["status"]] += 1
    report.tiles += tiles
    report.busy_s["load"] += r["load_s"] or 0.0
    report.busy_s["aggregate"] += r["aggregate_s"] or 0.0
    watch.add_tiles(report.aggregator, tiles, read=tiles)
    watch.decided(report.aggregator, r["status"], r["error_type"] or "")
    watch.tick()


def _write_page(store: FeatureStore, report: AggregateReport, rows: list[dict[str, Any]], watch: RunWatch) -> None:
    try:
        from pathray.monitor.page import write_aggregate_page

        report.html = write_aggregate_page(store, report, rows, watch.series)
    except Exception:  # noqa: BLE001 - the page is a view of the run: never its outcome
        log.exception("could not write the run's report.html")


def _run_local(
    config: AggregateConfig, spec: AggregatorSpec, store: FeatureStore, todo: list[str], provenance: dict[str, Any]
):
    """The Ray plan's two stages in this process, slide by slide (no Ray to start: a CPU box
    mean-pools a cohort in seconds); yields one result row per slide of ``todo``."""
    stage = SlideAggregatorStage(config, spec, "cpu", provenance)
    for slide_id in todo:
        loaded = load_slides(pa.table({"slide_id": [slide_id]}), store.root, config.storage_options, config.model)
        yield from stage(loaded).to_pylist()


def _run_dataset(
    config: AggregateConfig,
    spec: AggregatorSpec,
    store: FeatureStore,
    todo: list[str],
    provenance: dict[str, Any],
    report: AggregateReport,
    progress_bars: bool,
):
    """Build and consume the Ray Data plan; yields one result row per slide of ``todo``."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if not ray.is_initialized():
        if not (config.ray_address or os.environ.get("RAY_ADDRESS")):
            quiet_local_ray_env()
        ray.init(address=config.ray_address, log_to_driver=progress_bars)
    res = plan_aggregate_resources(spec, ray.cluster_resources(), config)
    report.resources = dataclasses.asdict(res)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.execution_options.preserve_order = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ray.data.from_arrow([pa.table({"slide_id": todo[i : i + 4]}) for i in range(0, len(todo), 4)])
        ds = ds.map_batches(
            load_slides,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=res.loader_num_cpus,
            **PLACEMENT,
            fn_kwargs={"root": store.root, "storage_options": config.storage_options, "model": config.model},
        )
        ds = ds.map_batches(
            SlideAggregatorStage,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=res.actor_num_cpus,
            **PLACEMENT,
            num_gpus=res.actor_num_gpus,
            compute=ActorPoolStrategy(min_size=1, max_size=res.actors),
            fn_constructor_kwargs={
                "config": config,
                "spec": spec,
                "base_provenance": provenance,
                "device": "cuda" if res.actor_num_gpus else "cpu",
            },
        )
    log_ray_plan_warnings(caught)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()  # one small row per slide
