"""The driver loop both runners share: result rows in, decisions out.

:func:`drive` feeds each result row to a :class:`~pathray.job.tracker.CompletionTracker`;
a failed (slide, model) is recorded at once, a finished one goes through the committer pool
(:class:`CommitQueue`, :mod:`pathray.job.committers`). Every decision lands in the run's
:class:`~pathray.store.ledger.StatusLedger`, :class:`~pathray.job.report.RunReport`, live
progress and outage breaker (:func:`record`). What the loop needs of the run is its
:class:`RunContext`, decided before any runner starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TextIO

import pyarrow as pa

from pathray import __version__
from pathray.job.committers import CommitPool, LocalCommitPool
from pathray.job.config import JobConfig
from pathray.job.modelplan import ModelPlan
from pathray.job.outage import OutageBreaker
from pathray.job.report import RunReport
from pathray.job.rows import error_fields
from pathray.job.storeversion import StoreRecords
from pathray.job.tracker import Complete, CompletionTracker, Failed
from pathray.manifest import SlideEntry
from pathray.monitor.watch import RunWatch
from pathray.store import CommitRequest, FeatureStore, status_row
from pathray.store.lease import StoreLease
from pathray.store.ledger import StatusLedger
from pathray.wsi.facts import SlideFacts, status_fields

log = logging.getLogger("pathray")

PROGRESS_EVERY_S = 30.0


@dataclass
class RunContext:
    """What every part of one run's driver needs, decided before Ray starts."""

    config: JobConfig
    store: FeatureStore
    store_hash: str
    records: StoreRecords  # the run's tiling and model records, for provenance
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


class CommitQueue:
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
        entry, facts = run.entries[done.slide_id], SlideFacts.from_json(r["slide_facts"])
        prov = {
            "model": model_provenance,
            "tiling": run.records.tiling_of(done.model),
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
        self.inflight[ref] = dict(status_base(run, r, facts), status="ok" if r["n_tiles_slide"] else "no_tissue")
        self.settle(block=False)

    def settle(self, block: bool) -> None:
        """Collect finished commits (all of them when ``block``)."""
        while self.inflight and (block or len(self.inflight) >= self.limit):
            done = self.pool.wait_one(list(self.inflight))
            row = self.inflight.pop(done)
            try:
                self.pool.result(done)
            except Exception as exc:
                row = dict(row, **error_fields("finalize", exc))
            record(self.run, row)


def status_base(run: RunContext, r: dict, facts: SlideFacts | None) -> dict:
    """The status row of a result row's (slide, model), with the slide's facts when known
    (the slide's path and cohort are the manifest's)."""
    entry = run.entries[r["slide_id"]]
    fields = status_fields(facts) if facts else {}
    fields.update(slide_id=r["slide_id"], model=r["model"], path=entry.path, cohort=entry.cohort)
    return status_row(**fields, run_id=run.run_id, n_tiles=r["n_tiles_slide"])


def error_row(run: RunContext, entry: SlideEntry, model: str, stage: str, error_type: str, message: str) -> dict:
    """The status row of a manifest entry that failed for ``model`` at ``stage`` before its
    slide was opened (no slide facts)."""
    return status_row(
        slide_id=entry.slide_id,
        model=model,
        path=entry.path,
        cohort=entry.cohort,
        status="error",
        stage=stage,
        error_type=error_type,
        error_message=message,
        run_id=run.run_id,
    )


def record(run: RunContext, row: dict) -> None:
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


def account(r: dict, report: RunReport, busy: dict[str, float], provenance: dict[str, dict]) -> None:
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


def drive(results: Iterable[pa.Table], pool: CommitPool | LocalCommitPool, run: RunContext) -> None:
    """Consume result tables; commit finished (slide, model) pairs; record every decision."""
    commits, tracker = CommitQueue(pool, run), CompletionTracker()
    busy = {"plan": 0.0, "read": 0.0, "write": 0.0, **{f"encode:{m}": 0.0 for m in run.model_names}}
    provenance: dict[str, dict] = {}
    last_log = time.time()
    for batch in results:
        for r in batch.to_pylist():
            account(r, run.report, busy, provenance)
            if run.watch is not None:
                run.watch.add_tiles(r["model"], r["n_tiles"] or 0, (r["tiles_read"] or 0) if r["first"] else 0)
            decision = tracker.add(r)
            if isinstance(decision, Failed):  # staged chunks stay; a re-run overwrites them
                record(
                    run,
                    dict(
                        status_base(run, r, SlideFacts.from_json(r["slide_facts"])),
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
            log_progress(run.report, tracker.in_flight)
    commits.settle(block=True)
    run.report.busy_s = busy


def log_progress(report: RunReport, in_flight: int) -> None:
    done = {m: c["ok"] + c["no_tissue"] + c["error"] for m, c in report.per_model.items()}
    log.info(
        "progress: %d (chunk, model) results, %d tiles read; (slide, model) pairs done %s of %d, %d in flight",
        report.chunks_done,
        report.tiles_read,
        done,
        report.pairs_to_do,
        in_flight,
    )
