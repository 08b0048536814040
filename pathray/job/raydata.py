"""The job: manifest -> plan -> read -> encode (one pool per model) -> write -> commit.

:func:`run_job` settles everything before a stage runs (models, manifest, store version,
the store's lease, what is left to do: :mod:`pathray.job.resume`) and hands the slides to a
runner: the Ray Data plan here (:func:`build_dataset`: the stages of
:func:`pathray.job.stageplan.build_stages` as actor pools sized by
:mod:`pathray.job.resources`, on a Ray set up by :mod:`pathray.job.runtime`), or the
in-process runner (:mod:`pathray.job.localrun`) where there is no Ray cluster to join and no
GPU. Both feed the driver loop of :mod:`pathray.job.drive`; one driver per store:
:mod:`pathray.store.lease`.

Driver memory is bounded by the slides *in flight* (plus the manifest itself): decided
(slide, model) pairs leave the tracker, and status/error rows are flushed to the store in
parts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import pyarrow as pa

from pathray.encoders.custom import CustomEncoder
from pathray.errors import LeaseLostError, SlideIdConflictError, UnknownModelError, cap_message
from pathray.job.committers import CommitPool, committer_count
from pathray.job.config import JobConfig, fingerprint
from pathray.job.drive import RunContext, drive, error_row, record
from pathray.job.localrun import choose_runner, prepare_encoders, run_local
from pathray.job.modelplan import ModelPlan, plan_models
from pathray.job.outage import read_reachable
from pathray.job.report import RunReport
from pathray.job.resources import Resources, cpu_placement, gpu_node_ids, plan_resources
from pathray.job.resume import resume_state
from pathray.job.rows import SLIDE_SCHEMA, passthrough_schema, slide_row
from pathray.job.runtime import configure_data_context, init_ray, kill_stage_actors, new_run_id
from pathray.job.stageplan import JobStages, Stage, build_stages
from pathray.job.storeversion import StoreRecords, choose_store
from pathray.monitor.watch import RunWatch
from pathray.store import FeatureStore, consolidate_slide_table
from pathray.store.lease import StoreLease
from pathray.store.ledger import StatusLedger

log = logging.getLogger("pathray")


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
    entries = read_reachable(config)
    report.slides_in_manifest = len(entries)
    records = StoreRecords.of(config, models)
    store = choose_store(config, records)
    if store.root != config.out.rstrip("/"):
        log.warning("config differs from %s: writing store version %s", config.out, store.root)
    report.store = store.root
    runner = choose_runner(config)
    encoders = prepare_encoders(build_stages(config, models, store.root).encode) if runner == "local" else None
    with StoreLease(store, run_id) as lease:
        run = RunContext(
            config,
            store,
            _prepare_store(store, records, models, lease),
            records,
            models,
            {e.slide_id: e for e in entries},
            passthrough_schema(entries, config.keep_columns),
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


def _prepare_store(store: FeatureStore, records: StoreRecords, models: list[ModelPlan], lease: StoreLease) -> str:
    """Under the lease: the store's config written if new (its hash returned), and what
    interrupted runs left behind removed (temporaries, staged chunks of committed slides)."""
    if lease.took_over is not None:
        log.warning("took over the lease of %s: its holder stopped heart-beating", lease.took_over.describe())
    store_hash = fingerprint(store.ensure_config(records.tiling, records.models, records.model_tilings).to_json())
    store.remove_temporaries()
    for model in models:
        store.remove_committed_staging(model.name)
    return store_hash


def _record_unknown(run: RunContext, unknown: list[tuple[str, str]]) -> None:
    """An unknown model name fails every slide (recorded like any other per-slide failure)."""
    for name, message in unknown:
        for e in run.entries.values():
            run.ledger.record(error_row(run, e, name, "config", UnknownModelError.error_type, message))
        run.report.per_model[name] = {"ok": 0, "no_tissue": 0, "error": len(run.entries), "tiles": 0}
        run.report.errors += len(run.entries)


def _todo(run: RunContext) -> list[dict]:
    """Slide rows for the planner: every slide with a model not yet committed. A slide id
    committed from another slide (path or cohort) is a ``slide_id_conflict`` error, never
    skipped as done."""
    state = resume_state(run.store, run.model_names, run.entries.values())
    run.report.committed_before = {m: len(state.committed[m]) for m in run.model_names}
    for e, model, message in state.conflicts:
        record(run, error_row(run, e, model, "plan", SlideIdConflictError.error_type, message))
    todo = [slide_row(e, need) for e, need in state.todo]
    run.report.slides_skipped = state.fully_committed(run.entries.values())
    run.report.pairs_to_do = sum(len(t["models"]) for t in todo)
    return todo


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
                run_local(run, todo)
            else:
                _run_ray(run, todo, progress_bars)
        except BaseException as exc:  # Ray failure, timeout, Ctrl-C: keep what is known, then re-raise
            run.report.aborted = cap_message(f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, LeaseLostError):  # the store may be another driver's now: leave it alone
                _close_run(run)
            raise
    return _close_run(run)


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


# --- the Ray runner -----------------------------------------------------------------------------
def _run_ray(run: RunContext, todo: list[dict], progress_bars: bool) -> None:
    """The Ray Data plan on the cluster at ``ray_address`` (the submitted job's, or a local
    one started here without its dashboard)."""
    import ray

    init_ray(run.config.ray_address, progress_bars)
    res = plan_resources(run.config, ray.cluster_resources(), len(run.models))
    run.report.resources = dataclasses.asdict(res)
    log.info("resources: %s", run.report.resources)
    configure_data_context(progress_bars, run.config.resources.object_store_limit_gb)
    stages = build_stages(run.config, run.models, run.store.root, res.encoder_threads)
    placement = cpu_placement(gpu_node_ids(ray.nodes()))
    ds = build_dataset(stages, res, todo, run.config.resources.chunks_per_encode_call, placement)
    pool = CommitPool(
        ray,
        run.store,
        committer_count(run.config.resources.committers, ray.cluster_resources()),
        max_concurrency=run.config.resources.max_inflight_finalize,
    )
    run.report.resources["committers"] = len(pool)
    try:
        drive(ds.iter_batches(batch_size=None, batch_format="pyarrow"), pool, run)
    except BaseException:
        kill_stage_actors(run.report.started_at)
        raise


@dataclass(frozen=True)
class Operator:
    """One stage as a Ray Data operator: a pool of ``min_actors`` to ``max_actors`` actors, each
    claiming ``num_cpus`` CPUs and ``num_gpus`` GPUs (``None``: none) and called with
    ``batch_size`` chunk rows (``None``: a whole block), placed by ``placement`` (Ray Data's named
    placement arguments: :func:`~pathray.job.resources.cpu_placement` for a stage without GPUs)."""

    stage: Stage
    batch_size: int | None
    num_cpus: float
    min_actors: int
    max_actors: int
    num_gpus: float | None = None
    placement: dict[str, Any] = dataclasses.field(default_factory=dict)


def operators(
    stages: JobStages, res: Resources, chunks_per_encode_call: int, placement: dict[str, Any]
) -> list[Operator]:
    """The operators of the plan, in order: plan -> read -> encode (one pool per model) -> write;
    ``placement`` (:func:`~pathray.job.resources.cpu_placement`) places every stage that claims no GPU."""
    encode = [
        Operator(
            s,
            chunks_per_encode_call,
            res.encoder_num_cpus,
            res.encoder_actors_min,
            res.encoder_actors,
            num_gpus=res.encoder_num_gpus,
            placement={} if res.encoder_num_gpus else placement,
        )
        for s in stages.encode
    ]
    return [
        Operator(stages.plan, 1, res.plan_num_cpus, 1, res.planners, placement=placement),
        # a reader takes a planned block whole (every chunk of its slides) and yields chunk by chunk
        Operator(stages.read, None, res.reader_num_cpus, 1, res.readers, placement=placement),
        *encode,
        Operator(stages.write, 1, res.write_num_cpus, 1, res.writers, placement=placement),
    ]


def build_dataset(
    stages: JobStages, res: Resources, todo: list[dict], chunks_per_encode_call: int, placement: dict[str, Any]
):
    """The Ray Data plan over the slide rows ``todo`` (lazy: nothing runs until it is consumed)."""
    import ray

    table = pa.Table.from_pylist(todo, schema=SLIDE_SCHEMA)
    per_block = max(1, min(16, len(todo) // (8 * res.readers) or 1))
    ds = ray.data.from_arrow([table.slice(i, per_block) for i in range(0, len(todo), per_block)])
    return chain(ds, operators(stages, res, chunks_per_encode_call, placement))


def chain(ds: Any, ops: Iterable[Operator]) -> Any:
    """``ds`` through each operator's actor pool (``map_batches`` over Arrow batches)."""
    from ray.data import ActorPoolStrategy

    for op in ops:
        ds = ds.map_batches(
            op.stage.fn,
            batch_size=op.batch_size,
            batch_format="pyarrow",
            num_cpus=op.num_cpus,
            num_gpus=op.num_gpus,
            compute=ActorPoolStrategy(min_size=op.min_actors, max_size=op.max_actors),
            fn_constructor_kwargs=op.stage.kwargs,
            **op.placement,
        )
    return ds
