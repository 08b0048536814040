"""Where a manifest stands against a store: what is committed, what is still to do, and which
slide ids are committed from another slide. Read by the run (what to do) and the dry run (what
it would do); :mod:`pathray.exchange.importing` applies the same conflict rule."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pathray.manifest import SlideEntry
from pathray.store import NO_COHORT, CommitRecord, FeatureStore


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
