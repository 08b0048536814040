"""`pathray aggregate` as a Ray Data job: committed tile features -> one slide-level row per slide.

Plan: the driver lists the tile model's commit records and the aggregator's, and sends
only slides committed for the tile model and not yet aggregated. Ray Data then runs the two
stages of :mod:`pathray.slide_level.stages`:

1. :func:`~pathray.slide_level.stages.load_slides` (CPU tasks): per slide, its features file,
   read once and checked against its commit record -> tiles as bytes;
2. :class:`~pathray.slide_level.stages.SlideAggregatorStage` (actor pool; one GPU per actor
   when the aggregator is ``accelerated`` and the cluster has GPUs): builds the aggregator once
   per actor, computes each slide's embedding and commits it (:func:`pathray.store.commit_file`):
   the one-row Parquet file ``slide_features/model=<m>/aggregator=<a>/<slide_id>.parquet``,
   then its commit record under ``_commits/``.

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
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import pyarrow as pa

from pathray import __version__
from pathray.errors import StoreConfigMismatchError, cap_message
from pathray.job.config import fingerprint
from pathray.job.localrun import choose_runner
from pathray.job.resources import cpu_placement, gpu_node_ids
from pathray.job.runtime import configure_data_context, init_ray, new_run_id
from pathray.monitor.html import MAX_TABLE_ROWS
from pathray.monitor.watch import RunWatch
from pathray.slide_level.aggregators import AggregatorSpec, describe_tiling, get_aggregator
from pathray.slide_level.stages import SlideAggregatorStage, load_slides
from pathray.store import ERROR_SCHEMA, FeatureStore, StoreConfig
from pathray.store.layout import AGGREGATOR_PIN
from pathray.store.lease import StoreLease

log = logging.getLogger("pathray")


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


@dataclass
class AggregateRun:
    """One run once the store's lease is held: its inputs, and the report it fills."""

    config: AggregateConfig
    spec: AggregatorSpec
    store: FeatureStore
    report: AggregateReport
    lease: StoreLease
    store_hash: str  # fingerprint of the store config in force (provenance: store_config_hash)


# --- driver -----------------------------------------------------------------------------------
def pin_aggregator(
    store: FeatureStore, model: str, spec: AggregatorSpec, weights: str | None, done: set[str]
) -> dict[str, Any]:
    """Write or check the aggregator identity (spec + weights) of this output folder. Other
    weights are refused once any slide (``done``) is committed under it; until then the new
    identity replaces the old (a first run whose weights could not be loaded commits nothing)."""
    record = spec.record(weights)
    record["fingerprint"] = fingerprint(record)
    relpath = AGGREGATOR_PIN.file(model=model, aggregator=spec.name)
    existing = store.read_json(relpath)
    if existing is None or (existing["fingerprint"] != record["fingerprint"] and not done):
        store.write_json(relpath, record)
    elif existing["fingerprint"] != record["fingerprint"]:
        raise StoreConfigMismatchError(
            f"slide_features for {model}/{spec.name} in {store.root} were made with "
            f"{json.dumps({k: existing.get(k) for k in ('weights', 'builder')})}; this run uses "
            f"{json.dumps({k: record[k] for k in ('weights', 'builder')})}"
        )
    return record


def check_inputs(
    store: FeatureStore, store_config: StoreConfig | None, config: AggregateConfig, spec: AggregatorSpec
) -> None:
    """Refuse a run that cannot produce meaningful rows, before any work starts: a tile model
    the aggregator was not trained on, a store tiled otherwise than it needs, a model not in
    the store. The message gives the ``pathray embed`` command that writes what it needs (into
    this store unless the model is already there at another tiling: a store holds each model at
    one tiling). ``store_config``: the store's config (``None``: no store there yet)."""
    models = store_config.models if store_config else {}
    tiling = store_config.tiling_of(config.model) if store_config else {}
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
    store_config = store.read_config()  # the run's one read of it
    check_inputs(store, store_config, config, spec)
    run_id = config.run_id or new_run_id("agg-")
    report = AggregateReport(
        run_id=run_id, store=store.root, model=config.model, aggregator=spec.name, started_at=time.time()
    )
    with StoreLease(store, run_id) as lease:
        run = AggregateRun(config, spec, store, report, lease, fingerprint(store_config.to_json()))
        return _aggregate_locked(run, progress_bars, display)


def _aggregate_locked(run: AggregateRun, progress_bars: bool, display: TextIO | None) -> AggregateReport:
    """The body of :func:`run_aggregate` once the store's lease is held; the lease is checked
    for every result (commits happen in the actors: a lost lease stops the run at once).
    ``progress_bars``: Ray's output; ``display``: the live progress's stream."""
    config, spec, store, report = run.config, run.spec, run.store, run.report
    committed, done = store.committed(config.model), store.aggregated(config.model, spec.name)
    record = pin_aggregator(store, config.model, spec, config.weights, done)
    todo = sorted(committed - done)
    report.slides_committed, report.slides_skipped = len(committed), len(committed) - len(todo)
    failed, shown = [], []  # error rows; the page's per-slide rows
    watch = RunWatch({spec.name: len(todo)}, display, read_stage="load")
    try:
        for r in _results(run, todo, record, progress_bars) if todo else ():
            run.lease.ensure_held()
            failed += [r] if r["status"] == "error" else []
            _count(r, report, watch)
            shown += [dict(r, model=spec.name)] if len(shown) < MAX_TABLE_ROWS else []
    except BaseException as exc:  # Ray failure, Ctrl-C: keep what is known (a re-run resumes), then re-raise
        report.aborted = cap_message(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        watch.close()
        if run.lease.lost is None:  # a lost store may be another driver's now: leave it alone
            _save(run, failed, shown, watch)
    return report


def _results(run: AggregateRun, todo: list[str], aggregator_record: dict[str, Any], progress_bars: bool):
    """One result row per slide of ``todo``, from the stages run in this process or by Ray Data."""
    provenance = {
        "aggregator": aggregator_record,
        "tile_model": run.config.model,
        "run_id": run.report.run_id,
        "pathray_version": __version__,
        "store_config_hash": run.store_hash,
    }
    run.report.runner = choose_runner(run.config)
    if run.report.runner == "local":
        return _run_local(run, todo, provenance)
    return _run_dataset(run, todo, provenance, progress_bars)


def _save(run: AggregateRun, failed: list[dict[str, Any]], shown: list[dict[str, Any]], watch: RunWatch) -> None:
    """The run's error rows, its report and its page, into the store."""
    store, report = run.store, run.report
    errors = _errors_table(failed, run.config.model, run.spec.name)
    if errors.num_rows:
        store.write_table(store.errors_relpath(report.run_id, 1), errors)
    report.ended_at = time.time()
    store.write_json(store.report_relpath(report.run_id), report.to_dict())
    _write_page(store, report, shown, watch)


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


def _run_local(run: AggregateRun, todo: list[str], provenance: dict[str, Any]):
    """The Ray plan's two stages in this process, slide by slide (no Ray to start: a CPU box
    mean-pools a cohort in seconds); yields one result row per slide of ``todo``."""
    config = run.config
    stage = SlideAggregatorStage(config, run.spec, "cpu", provenance)
    for slide_id in todo:
        loaded = load_slides(pa.table({"slide_id": [slide_id]}), run.store.root, config.storage_options, config.model)
        yield from stage(loaded).to_pylist()


def _run_dataset(run: AggregateRun, todo: list[str], provenance: dict[str, Any], progress_bars: bool):
    """Build and consume the Ray Data plan; yields one result row per slide of ``todo``."""
    import ray

    init_ray(run.config.ray_address, progress_bars)
    res = plan_aggregate_resources(run.spec, ray.cluster_resources(), run.config)
    run.report.resources = dataclasses.asdict(res)
    configure_data_context(progress_bars)
    ds = _plan(run, todo, provenance, res)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()  # one small row per slide


def _plan(run: AggregateRun, todo: list[str], provenance: dict[str, Any], res: AggregateResources):
    """The Ray Data plan: slide ids in blocks of 4 -> :func:`load_slides` tasks ->
    :class:`SlideAggregatorStage` actors, at the resources ``res`` plans."""
    import ray
    from ray.data import ActorPoolStrategy

    config = run.config
    placement = cpu_placement(gpu_node_ids(ray.nodes()))  # loaders, and aggregators without GPUs
    ds = ray.data.from_arrow([pa.table({"slide_id": todo[i : i + 4]}) for i in range(0, len(todo), 4)])
    ds = ds.map_batches(
        load_slides,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=res.loader_num_cpus,
        **placement,
        fn_kwargs={"root": run.store.root, "storage_options": config.storage_options, "model": config.model},
    )
    return ds.map_batches(
        SlideAggregatorStage,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=res.actor_num_cpus,
        num_gpus=res.actor_num_gpus,
        **({} if res.actor_num_gpus else placement),
        compute=ActorPoolStrategy(min_size=1, max_size=res.actors),
        fn_constructor_kwargs={
            "config": config,
            "spec": run.spec,
            "base_provenance": provenance,
            "device": "cuda" if res.actor_num_gpus else "cpu",
        },
    )
