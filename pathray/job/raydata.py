"""The job: manifest -> plan -> read -> encode (one pool per model) -> write -> commit.

Stages are the Ray-free callables of :mod:`pathray.job.stages`; this module wires them into
Ray Data (:func:`run_job`, :func:`_build_dataset`), or hands them to the in-process runner
(:mod:`pathray.job.localrun`) where there is no Ray cluster to join and no GPU, and runs the
driver loop both share (:func:`_drive`): result rows go through a :class:`~pathray.job.tracker.CompletionTracker`,
finished (slide, model) pairs to the committer pool (:mod:`pathray.job.committers`), and every
decision to the run's :class:`~pathray.store.ledger.StatusLedger` and
:class:`~pathray.job.report.RunReport`. Resources: :mod:`pathray.job.resources`; models:
:mod:`pathray.job.modelplan`; one driver per store: :mod:`pathray.store.lease`.

Driver memory is bounded by the slides *in flight* (plus the manifest itself): decided
(slide, model) pairs leave the tracker, and status/error rows are flushed to the store in
parts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import pyarrow as pa

from pathray import __version__
from pathray.encoders.custom import CustomEncoder
from pathray.errors import (
    LeaseLostError,
    SlideIdConflictError,
    StoreConfigMismatchError,
    UnknownModelError,
    cap_message,
    describe,
)
from pathray.job.committers import CommitPool, LocalCommitPool, committer_count
from pathray.job.config import JobConfig, fingerprint, model_tiling_records, tiling_record
from pathray.job.localrun import READ_AHEAD_CHUNKS, choose_runner, local_results, prepare_encoders
from pathray.job.modelplan import ModelPlan, plan_models
from pathray.job.outage import OutageBreaker, check_reachable, check_slide_sources
from pathray.job.report import RunReport
from pathray.job.resources import PLACEMENT, Resources, local_gpus, plan_resources
from pathray.job.stages import SLIDE_SCHEMA, ChunkEncoder, ChunkReader, ChunkWriter, SlidePlanner
from pathray.job.tracker import Complete, CompletionTracker, Failed
from pathray.manifest import SlideEntry, read_manifest
from pathray.monitor.runlog import log_ray_plan_warnings, new_run_id, quiet_local_ray_env
from pathray.monitor.watch import RunWatch
from pathray.store import NO_COHORT, CommitRecord, CommitRequest, FeatureStore, consolidate_slide_table, status_row
from pathray.store.lease import StoreLease
from pathray.store.ledger import StatusLedger
from pathray.tiling.grid import TilingConfig, TilingGroup
from pathray.wsi.facts import SlideFacts

log = logging.getLogger("pathray")

PROGRESS_EVERY_S = 30.0

__all__ = ["CustomEncoder", "RunReport", "Resources", "dry_run_plan", "plan_resources", "run_job"]


@dataclass
class RunContext:
    """What every part of one run's driver needs, decided before Ray starts."""

    config: JobConfig
    store: FeatureStore
    store_hash: str
    tiling_rec: dict[str, Any]  # the run's tiling's store record (with its fingerprint), for provenance
    model_tiling_recs: dict[str, dict[str, Any]]  # models cut at their own native tile: their tiling records
    models: list[ModelPlan]
    entries: dict[str, SlideEntry]  # by slide id
    passthrough_schema: pa.Schema
    ledger: StatusLedger
    report: RunReport
    runner: str = "ray"  # pathray.job.localrun.choose_runner
    #: the in-process runner's encode stages, loading since before the lease (localrun.prepare_encoders)
    encoders: Future | None = None
    lease: StoreLease | None = None  # checked before every commit (ensure_held)
    breaker: OutageBreaker = dataclasses.field(default_factory=OutageBreaker)  # stops a run its storage fails
    #: where the live progress display goes (None: none); the watch is made once the work is known
    display: TextIO | None = None
    watch: RunWatch | None = None
    #: per model, the features files of the slides to do, listed once under the lease (FeatureStore.feature_copies)
    copies: dict[str, dict[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.report.run_id

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def tiling_rec_of(self, model: str) -> dict[str, Any]:
        return self.model_tiling_recs.get(model, self.tiling_rec)


def _choose_store(
    config: JobConfig, tiling_rec: dict, model_recs: dict[str, dict], model_tilings: dict[str, dict]
) -> FeatureStore:
    """The store this run writes: ``out``, or with ``new_version`` and a config mismatch,
    ``out/versions/<hash>``. Only reads; raises :class:`StoreConfigMismatchError` otherwise."""
    store = FeatureStore(config.out, config.storage_options)
    try:
        store.check_config(tiling_rec, model_recs, model_tilings)
        return store
    except StoreConfigMismatchError:
        if not config.new_version:
            raise
    identity = {"tiling": tiling_rec["fingerprint"], "models": sorted(r["fingerprint"] for r in model_recs.values())}
    if model_tilings:  # runs with one tiling keep the version names they always had
        identity["model_tilings"] = {m: r["fingerprint"] for m, r in model_tilings.items()}
    store = FeatureStore(f"{config.out.rstrip('/')}/versions/{fingerprint(identity)}", config.storage_options)
    store.check_config(tiling_rec, model_recs, model_tilings)
    return store


def _passthrough_schema(entries, keep: tuple[str, ...]) -> pa.Schema:
    if not keep:
        return pa.schema([])
    schema = pa.Table.from_pylist([{c: e.extra.get(c) for c in keep} for e in entries]).schema
    return pa.schema([pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in schema])


def run_job(
    config: JobConfig,
    custom_encoders: dict[str, CustomEncoder] | None = None,
    progress_bars: bool = True,
    display: TextIO | None = None,
) -> RunReport:
    """Run one embedding job end to end and return its report (also saved in the store, with
    ``report.html``). ``progress_bars``: Ray's own output (Ray Data's bars, a local Ray's worker
    logs); ``display``: the stream of the live progress (:class:`~pathray.monitor.watch.RunWatch`).

    Per-slide failures never raise: they end as error rows and a non-zero
    :attr:`RunReport.exit_code`. Raised: an unusable manifest (:class:`ManifestError`), a
    config mismatch with the existing store (:class:`StoreConfigMismatchError`), another
    live driver on the store (:class:`StoreBusyError`), no usable model at all
    (:class:`UnknownModelError`), an unreachable manifest, store or slide source, or slides
    failing one after another for want of storage (:class:`StorageUnreachableError`, see
    :mod:`pathray.job.outage`), or a lease lost mid-run (:class:`LeaseLostError`)."""
    run_id = config.run_id or new_run_id()
    report = RunReport(run_id=run_id, store=config.out, started_at=time.time(), config=config.public_dict())
    models, unknown = plan_models(config, custom_encoders)
    if not models:
        raise UnknownModelError("; ".join(msg for _, msg in unknown))
    entries = _read_reachable(config)
    runner = choose_runner(config)
    encoders = prepare_encoders(config, models) if runner == "local" else None
    report.slides_in_manifest = len(entries)
    tiling_rec = tiling_record(config.tiling)
    model_recs = {m.name: m.record for m in models}
    model_tilings = model_tiling_records(config, list(model_recs))
    store = _choose_store(config, tiling_rec, model_recs, model_tilings)
    if store.root != config.out.rstrip("/"):
        log.warning("config differs from %s: writing store version %s", config.out, store.root)
    report.store = store.root
    with StoreLease(store, run_id) as lease:
        if lease.took_over is not None:
            log.warning("took over the lease of %s: its holder stopped heart-beating", lease.took_over.describe())
        store_hash = fingerprint(store.ensure_config(tiling_rec, model_recs, model_tilings).to_json())
        store.remove_temporaries()
        for model in models:
            store.remove_committed_staging(model.name)
        run = RunContext(
            config,
            store,
            store_hash,
            tiling_rec,
            model_tilings,
            models,
            {e.slide_id: e for e in entries},
            _passthrough_schema(entries, config.keep_columns),
            StatusLedger(store, run_id),
            report,
            runner,
            encoders,
            lease,
            display=display,
        )
        report.per_model = {m.name: {"ok": 0, "no_tissue": 0, "error": 0, "tiles": 0} for m in models}
        _record_unknown(run, unknown)
        return _run_locked(run, progress_bars)


def _read_reachable(config: JobConfig) -> list[SlideEntry]:
    """The manifest's entries, after checking that the manifest, the store and the slides'
    source answer (:func:`pathray.job.outage.check_reachable`): an outage stops the run here,
    within seconds, instead of turning every slide into an error row."""
    log.info("checking that the manifest %s and the store %s can be reached", config.manifest, config.out)
    check_reachable(config.manifest, config.storage_options, "manifest")
    check_reachable(config.out, config.storage_options, "feature store")
    log.info("reading the manifest %s", config.manifest)
    entries = read_manifest(config.manifest, config.storage_options)
    log.info("%d slides in the manifest; checking that their storage can be reached", len(entries))
    check_slide_sources((e.path for e in entries), config.slide_options)
    return entries


def _record_unknown(run: RunContext, unknown: list[tuple[str, str]]) -> None:
    """An unknown model name fails every slide (recorded like any other per-slide failure)."""
    for name, message in unknown:
        for e in run.entries.values():
            run.ledger.record(
                status_row(
                    slide_id=e.slide_id,
                    model=name,
                    path=e.path,
                    cohort=e.cohort,
                    status="error",
                    stage="config",
                    error_type=UnknownModelError.error_type,
                    error_message=message,
                    run_id=run.run_id,
                )
            )
        run.report.per_model[name] = {"ok": 0, "no_tissue": 0, "error": len(run.entries), "tiles": 0}
        run.report.errors += len(run.entries)


def _todo(run: RunContext) -> list[dict]:
    """Slide rows for the planner: every slide with a model not yet committed. A slide id
    committed from another slide (path or cohort) is a ``slide_id_conflict`` error, never
    skipped as done."""
    state = resume_state(run.store, run.model_names, run.entries.values())
    run.report.committed_before = {m: len(state.committed[m]) for m in run.model_names}
    for e, model, message in state.conflicts:
        _record(
            run,
            status_row(
                slide_id=e.slide_id,
                model=model,
                path=e.path,
                cohort=e.cohort,
                status="error",
                stage="plan",
                error_type=SlideIdConflictError.error_type,
                error_message=message,
                run_id=run.run_id,
            ),
        )
    todo = [
        {"slide_id": e.slide_id, "path": e.path, "cohort": e.cohort or "", "mpp_override": e.mpp, "models": need}
        for e, need in state.todo
    ]
    run.report.slides_skipped = state.fully_committed(run.entries.values())
    run.report.pairs_to_do = sum(len(t["models"]) for t in todo)
    return todo


@dataclass(frozen=True)
class ResumeState:
    """Where a manifest stands against a store: per model the slide ids committed for the
    manifest's own slide; the slides with models still to do; and (entry, model, message)
    for each slide id committed from another slide."""

    committed: dict[str, set[str]]
    todo: list[tuple[SlideEntry, list[str]]]
    conflicts: list[tuple[SlideEntry, str, str]]

    def fully_committed(self, entries: Iterable[SlideEntry]) -> int:
        """How many of ``entries`` are committed for every model."""
        return sum(all(e.slide_id in ids for ids in self.committed.values()) for e in entries)


def resume_state(store: FeatureStore, models: list[str], entries: Iterable[SlideEntry]) -> ResumeState:
    """Compare each manifest entry with the commit record of its slide id, per model: no
    record -> to do; a record of the same path and cohort -> done; otherwise a conflict."""
    records = {m: store.commit_records(m) for m in models}
    committed: dict[str, set[str]] = {m: set() for m in models}
    todo, conflicts = [], []
    for e in entries:
        need = []
        for m in models:
            record = records[m].get(e.slide_id)
            message = slide_id_conflict(record, e) if record is not None else None
            if record is None:
                need.append(m)
            elif message:
                conflicts.append((e, m, message))
            else:
                committed[m].add(e.slide_id)
        if need:
            todo.append((e, need))
    return ResumeState(committed, todo, conflicts)


def slide_id_conflict(record: CommitRecord, entry: SlideEntry) -> str | None:
    """Why ``record`` (committed under ``entry``'s slide id) is not ``entry``'s slide, or None
    when path and cohort agree (a record without a path is compared on the cohort only)."""
    cohort = entry.cohort or NO_COHORT
    path = record.slide.get("path")
    if record.cohort == cohort and (path is None or path == entry.path):
        return None
    return (
        f"slide_id {entry.slide_id!r} is already committed for model {record.model!r} from {path} (cohort "
        f"{record.cohort!r}), but the manifest (row {entry.row}) lists {entry.path} (cohort {cohort!r}) under it; "
        "give the manifest a slide_id column with ids unique across the store (e.g. prefixed by cohort), "
        "or write to another --out"
    )


def _run_locked(run: RunContext, progress_bars: bool) -> RunReport:
    """The body of :func:`run_job` once the store's lease is held."""
    todo = _todo(run)
    run.watch = RunWatch({m: sum(m in t["models"] for t in todo) for m in run.model_names}, run.display)
    if todo:
        run.report.runner = run.runner
        for model in run.model_names:
            run.copies[model] = run.store.feature_copies(model, {t["slide_id"] for t in todo if model in t["models"]})
        try:
            if run.runner == "local":
                _run_local(run, todo)
            else:
                _run_ray(run, todo, progress_bars)
        except BaseException as exc:  # Ray failure, timeout, Ctrl-C: keep what is known, then re-raise
            run.report.aborted = cap_message(f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, LeaseLostError):  # the store may be another driver's now: leave it alone
                _close_run(run)
            raise
    return _close_run(run)


def _run_ray(run: RunContext, todo: list[dict], progress_bars: bool) -> None:
    """The Ray Data plan on the cluster at ``ray_address`` (the submitted job's, or a local
    one started here without its dashboard)."""
    import ray

    if not ray.is_initialized():
        local = not (run.config.ray_address or os.environ.get("RAY_ADDRESS"))
        if local:
            quiet_local_ray_env()
        ray.init(
            address=run.config.ray_address,
            log_to_driver=progress_bars,
            **({"include_dashboard": False} if local else {}),
        )
    res = plan_resources(run.config, ray.cluster_resources(), len(run.models))
    run.report.resources = dataclasses.asdict(res)
    log.info("resources: %s", run.report.resources)
    _configure_ray_data(run.config, progress_bars)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _build_dataset(run.config, run.store.root, run.models, res, todo)
    log_ray_plan_warnings(caught)
    pool = CommitPool(
        ray,
        run.store,
        committer_count(run.config.resources.committers, ray.cluster_resources()),
        max_concurrency=run.config.resources.max_inflight_finalize,
    )
    run.report.resources["committers"] = len(pool)
    try:
        _drive(ds.iter_batches(batch_size=None, batch_format="pyarrow"), pool, run)
    except BaseException:
        _kill_stage_actors(ray, run.report.started_at)
        raise


def _run_local(run: RunContext, todo: list[dict]) -> None:
    """The same stages in this process (:mod:`pathray.job.localrun`): no Ray at all."""
    import torch

    run.report.resources = {
        "encoder_threads": torch.get_num_threads(),
        "read_ahead_chunks": READ_AHEAD_CHUNKS,
        "committers": 1,
    }
    log.info("runner: local (the stages in this process, no Ray), %d torch threads", torch.get_num_threads())
    pool = LocalCommitPool(run.store)
    results = local_results(run.config, run.store.root, run.models, todo, run.encoders)
    try:
        _drive(results, pool, run)
    finally:
        results.close()
        pool.close()


def _kill_stage_actors(ray, since: float) -> None:
    """Kill this job's Ray Data stage actors started since ``since`` (unix s) after an abort.

    When its no-progress timeout fires, Ray Data releases the pools' actors without killing
    them, so an actor stuck in a task (a stalled encoder) would keep its CPUs until the task
    ends and starve a re-run in the same session. Uses Ray 2.60's actor table (pinned); if
    that is unavailable the run still aborts cleanly, only without this clean-up."""
    try:
        from ray._private.state import actors
        from ray._raylet import ActorID

        job = ray.get_runtime_context().get_job_id()
        core = ray._private.worker.global_worker.core_worker
        for actor_id, info in actors().items():
            if (
                info.get("State") == "ALIVE"
                and info.get("JobID") == job
                and info.get("StartTime", 0) >= since * 1000
                and str(info.get("ActorClassName", "")).startswith("MapWorker(")
            ):
                ray.kill(core.get_actor_handle(ActorID.from_hex(actor_id)))
    except Exception as exc:  # noqa: BLE001 - clean-up must never hide the abort's own error
        log.warning("could not kill the aborted run's stage actors: %s", exc)


def _configure_ray_data(config: JobConfig, progress_bars: bool) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False
    # Ray Data's per-30-s "operator uses N GiB per worker" warning fires for every model
    # actor (its memory is the model's, held on purpose); the run reports its own progress
    ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    if config.resources.object_store_limit_gb:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=int(config.resources.object_store_limit_gb * 2**30)
        )


def _close_run(run: RunContext) -> RunReport:
    """Flush status/error rows, rebuild slides.parquet, save the run report and its page."""
    run.ledger.flush()
    for model in run.model_names:  # the next run (and every reader) lists the records and reads this index
        run.store.update_commit_index(model)
    consolidate_slide_table(run.store, {m: run.store.committed(m) for m in run.model_names})
    run.report.ended_at = time.time()
    if run.watch is not None:
        run.watch.close()
        run.report.timeline = run.watch.series
    run.store.write_json(run.store.report_relpath(run.run_id), run.report.to_dict())
    try:
        from pathray.monitor.page import write_embed_page

        run.report.html = write_embed_page(run)
    except Exception:  # noqa: BLE001 - the page is a view of the run: never its outcome
        log.exception("could not write the run's report.html")
    return run.report


def _build_dataset(config: JobConfig, store_root: str, models: list[ModelPlan], res: Resources, todo: list[dict]):
    """plan -> read -> encode (one pool per model; the last drops the pixels) -> write."""
    import ray
    from ray.data import ActorPoolStrategy

    table = pa.Table.from_pylist(todo, schema=SLIDE_SCHEMA)
    per_block = max(1, min(16, len(todo) // (8 * res.readers) or 1))
    ds = ray.data.from_arrow([table.slice(i, per_block) for i in range(0, len(todo), per_block)])
    staging = dict(
        storage_options=config.slide_options, scratch_dir=config.scratch_dir, scratch_max_bytes=config.scratch_max_bytes
    )
    groups = config.tiling_groups([m.name for m in models])
    ds = ds.map_batches(
        SlidePlanner,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=res.plan_num_cpus,
        **PLACEMENT,
        compute=ActorPoolStrategy(min_size=1, max_size=res.planners),
        fn_constructor_kwargs=dict(tiling=groups, chunk_tiles=config.chunk_tiles, **staging),
    )
    # a reader takes a planned block whole (every chunk of its slides) and yields chunk by chunk
    ds = ds.map_batches(
        ChunkReader,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=res.reader_num_cpus,
        **PLACEMENT,
        compute=ActorPoolStrategy(min_size=1, max_size=res.readers),
        fn_constructor_kwargs=dict(tiling=groups, **staging),
    )
    for i, model in enumerate(models):
        ds = ds.map_batches(
            ChunkEncoder,
            batch_size=config.resources.chunks_per_encode_call,
            batch_format="pyarrow",
            **PLACEMENT,
            num_cpus=res.encoder_num_cpus,
            num_gpus=res.encoder_num_gpus,
            compute=ActorPoolStrategy(min_size=res.encoder_actors_min, max_size=res.encoder_actors),
            fn_constructor_kwargs=dict(
                model=model.name,
                make_encoder=model.factory,
                drop_pixels=i == len(models) - 1,
                threads=res.encoder_threads,
                output_dtype=model.output_dtype,
            ),
        )
    types = {m.name: m.output_dtype for m in models}
    return ds.map_batches(
        ChunkWriter,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=res.write_num_cpus,
        **PLACEMENT,
        compute=ActorPoolStrategy(min_size=1, max_size=res.writers),
        fn_constructor_kwargs=dict(
            root=store_root,
            storage_options=config.storage_options,
            models=[m.name for m in models],
            embedding_types=types,
        ),
    )


class _CommitQueue:
    """Finished (slide, model) pairs on their way through the committer pool: at most
    ``max_inflight_finalize`` per committer in flight; each outcome is counted and recorded."""

    def __init__(self, pool: CommitPool | LocalCommitPool, run: RunContext):
        self.pool, self.run = pool, run
        self.limit = run.config.resources.max_inflight_finalize * len(pool)
        self.inflight: dict[Any, dict] = {}

    def submit(self, done: Complete, model_provenance: dict) -> None:
        run, r = self.run, done.row
        if run.lease is not None:
            run.lease.ensure_held()
        entry, facts = run.entries[done.slide_id], SlideFacts.from_json(r["slide_meta"])
        prov = {
            "model": model_provenance,
            "tiling": run.tiling_rec_of(done.model),
            "run_id": run.run_id,
            "pathray_version": __version__,
            "store_config_hash": run.store_hash,
        }
        ref = self.pool.submit(
            CommitRequest(
                done.model,
                done.slide_id,
                entry.cohort,
                done.chunk_ids,
                r["n_tiles_slide"],
                facts.commit_fields(),
                prov,
                run.store_hash,
                run.run_id,
                {c: entry.extra.get(c) for c in run.config.keep_columns},
                run.passthrough_schema,
                run.copies.get(done.model, {}).get(done.slide_id, ()),
            )
        )
        self.inflight[ref] = dict(_status_base(run, r, facts), status="ok" if r["n_tiles_slide"] else "no_tissue")
        self.settle(block=False)

    def settle(self, block: bool) -> None:
        """Collect finished commits (all of them when ``block``)."""
        while self.inflight and (block or len(self.inflight) >= self.limit):
            done = self.pool.wait_one(list(self.inflight))
            row = self.inflight.pop(done)
            try:
                self.pool.result(done)
            except Exception as exc:
                error_type, message = describe(exc)
                row = dict(
                    row, status="error", stage="finalize", error_type=error_type, error_message=cap_message(message)
                )
            _record(self.run, row)


def _status_base(run: RunContext, r: dict, facts: SlideFacts | None) -> dict:
    """The status row of a result row's (slide, model), with the slide's facts when known."""
    entry = run.entries[r["slide_id"]]
    known = {k: getattr(facts, k) for k in ("width", "height", "mpp", "mpp_source", "vendor")} if facts else {}
    return status_row(
        slide_id=r["slide_id"],
        model=r["model"],
        path=entry.path,
        cohort=entry.cohort,
        run_id=run.run_id,
        n_tiles=r["n_tiles_slide"],
        **known,
    )


def _record(run: RunContext, row: dict) -> None:
    """Count a decided (slide, model) in the report and put its status row in the ledger."""
    counts = run.report.per_model[row["model"]]
    counts[row["status"]] += 1
    if run.watch is not None:
        run.watch.decided(row["model"], row["status"], row.get("error_type") or "")
    if row["status"] == "error":
        run.report.errors += 1
    else:
        counts["tiles"] += row["n_tiles"]
    run.ledger.record(row)
    run.breaker.record(
        row["slide_id"], row["error_type"] if row["status"] == "error" else None, row.get("error_message") or ""
    )


def _account(r: dict, report: RunReport, busy: dict[str, float], provenance: dict[str, dict]) -> None:
    """Stage timings, encode windows, tile counts and provenance carried by one result row."""
    model = r["model"]
    report.chunks_done += 1
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
    if r["provenance"] != "{}" and model not in provenance:
        provenance[model] = json.loads(r["provenance"])


def _drive(results: Iterable[pa.Table], pool: CommitPool | LocalCommitPool, run: RunContext) -> None:
    """Consume result tables; commit finished (slide, model) pairs; record every decision."""
    commits, tracker = _CommitQueue(pool, run), CompletionTracker()
    busy = {"plan": 0.0, "read": 0.0, "write": 0.0, **{f"encode:{m}": 0.0 for m in run.model_names}}
    provenance: dict[str, dict] = {}
    last_log = time.time()
    for batch in results:
        for r in batch.to_pylist():
            _account(r, run.report, busy, provenance)
            if run.watch is not None:
                run.watch.add_tiles(r["model"], r["n_tiles"] or 0, (r["tiles_read"] or 0) if r["first"] else 0)
            decision = tracker.add(r)
            if isinstance(decision, Failed):  # staged chunks stay; a re-run overwrites them
                _record(
                    run,
                    dict(
                        _status_base(run, r, SlideFacts.from_json(r["slide_meta"])),
                        status="error",
                        stage=r["stage"],
                        error_type=r["error_type"],
                        error_message=r["error_message"],
                    ),
                )
            elif decision is not None:
                commits.submit(decision, provenance.get(decision.model, {}))
        if run.watch is not None:
            run.watch.tick()
        if time.time() - last_log > PROGRESS_EVERY_S:
            last_log = time.time()
            _log_progress(run.report, tracker.in_flight)
    commits.settle(block=True)
    run.report.busy_s = busy


def _log_progress(report: RunReport, in_flight: int) -> None:
    done = {m: c["ok"] + c["no_tissue"] + c["error"] for m, c in report.per_model.items()}
    log.info(
        "progress: %d (chunk, model) results, %d tiles read; (slide, model) pairs done %s of %d, %d in flight",
        report.chunks_done,
        report.tiles_read,
        done,
        report.pairs_to_do,
        in_flight,
    )


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
    :func:`run_job`. Slide ids committed from another slide are listed in ``slide_id_conflicts``."""
    plans, unknown = plan_models(config, custom_encoders)
    models = [m.name for m in plans]
    entries = _read_reachable(config)
    log.info("checking the store's config and listing its committed slides")
    store = _choose_store(
        config, tiling_record(config.tiling), {m.name: m.record for m in plans}, model_tiling_records(config, models)
    )
    state = resume_state(store, models, entries)
    todo = [e for e, _ in state.todo]
    groups = config.tiling_groups(models) if models else (TilingGroup(config.tiling),)
    per_group = [
        dict(
            tile_px=g.tiling.tile_px,
            target_mpp=g.tiling.target_mpp,
            models=list(g.models or models),
            **_estimate_tiles(config, g.tiling, todo, sample),
        )
        for g in groups
    ]
    tiles = sum(g["estimated_tiles"] for g in per_group)
    cluster = {"CPU": float(os.cpu_count() or 1), "GPU": float(local_gpus())}
    return {
        "models": models,
        "unknown_models": [name for name, _ in unknown],
        "tiling": config.tiling.to_dict(),
        "tilings": per_group,
        "store": store.root,
        "store_exists": store.read_config() is not None,
        "slides_in_manifest": len(entries),
        "slides_already_committed": state.fully_committed(entries),
        "slides_to_do": len(todo),
        "slide_id_conflicts": [
            {"slide_id": e.slide_id, "model": m, "error_type": SlideIdConflictError.error_type, "message": message}
            for e, m, message in state.conflicts
        ],
        "tile_estimate": per_group[0]["tile_estimate"],
        "estimated_tiles": tiles,
        "sampled_slides": per_group[0]["sampled_slides"],
        "sample_errors": per_group[0]["sample_errors"],
        "estimated_chunks": sum(_chunks(g["estimated_tiles"], len(todo), config.chunk_tiles) for g in per_group),
        "store_objects": _store_objects(per_group, len(todo), config.chunk_tiles),
        "gpu_hours": _gpu_hours({m: g["estimated_tiles"] for g in per_group for m in g["models"]}),
        "local_resources": cluster,
        "runner_here": choose_runner(config),
        "resource_plan_here": dataclasses.asdict(plan_resources(config, cluster, max(1, len(models)))),
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


def _estimate_tiles(config: JobConfig, tiling: TilingConfig, todo: list[SlideEntry], sample: int) -> dict[str, Any]:
    from pathray.idc import estimate_tiles

    rows = [{"slide_id": e.slide_id, **e.extra} for e in todo]
    if rows and all(r.get("width_px") and r.get("index_mpp") for r in rows):
        estimate = estimate_tiles(rows, tiling.tile_px, tiling.target_mpp, tiling.stride_px)
        return {
            "tile_estimate": "index geometry (full grid, no tissue filter: an upper bound)",
            "estimated_tiles": estimate.grid_tiles,
            "sampled_slides": 0,
            "sample_errors": [],
        }
    planner = SlidePlanner(
        tiling, config.chunk_tiles, config.slide_options, config.scratch_dir, config.scratch_max_bytes
    )
    counts, errors = [], []
    try:
        for i, e in enumerate(todo[:sample]):
            log.info("planning sample slide %d/%d: %s (%s)", i + 1, min(sample, len(todo)), e.slide_id, e.path)
            rows = planner.plan_one(
                {"slide_id": e.slide_id, "path": e.path, "cohort": e.cohort or "", "models": [], "mpp_override": e.mpp}
            )
            if rows[0]["status"] == "error":
                errors.append(
                    {"slide_id": e.slide_id, "error_type": rows[0]["error_type"], "message": rows[0]["error_message"]}
                )
            counts.append(rows[0]["n_tiles_slide"])
    finally:
        planner.scratch.close()
    mean_tiles = float(np.mean(counts)) if counts else 0.0
    return {
        "tile_estimate": f"mean of {len(counts)} planned slides x slides to do",
        "estimated_tiles": round(mean_tiles * len(todo)),
        "sampled_slides": len(counts),
        "sample_errors": errors,
    }


def _gpu_hours(tiles: dict[str, int]) -> dict[str, Any]:
    """GPU-hours per registered model (``tiles``: the tiles each embeds) at the 50 %-MFU target
    rate on one H100 (bf16): a planning figure, not a measurement (no benchmarked GPU rate is
    recorded yet)."""
    from pathray.encoders.cost import TARGET_MFU, target_tiles_per_s
    from pathray.encoders.registry import REGISTRY

    hours = {m: round(n / target_tiles_per_s(m) / 3600, 2) for m, n in tiles.items() if m in REGISTRY}
    return {"basis": f"target rate at {TARGET_MFU:.0%} MFU on one H100 (bf16), not measured", "per_model": hours}
