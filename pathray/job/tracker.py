"""Completion tracking for the driver: result rows in, commit / record decisions out (no Ray).

The write stage emits one result row per (chunk, model). A (slide, model) is *done* when a
row for every one of its chunks has been seen (a slide without tissue or failed at planning
has one row and ``n_chunks == 0``). :class:`CompletionTracker` turns the stream into at most
one decision per (slide, model):

* :class:`Failed` at its first error row (later rows of that pair are dropped: their staged
  chunks stay until a re-run overwrites them);
* :class:`Complete` once every chunk was seen without error, with the staged chunk ids in
  chunk order (empty for a slide without tissue).

Rows repeated by a retried task, rows after the decision, and rows of several models
interleaved are all handled here, so the driver only acts on decisions. Memory: the chunks
of pairs in flight plus one key per decided pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Complete:
    """Every chunk of (slide_id, model) is staged: commit ``chunk_ids`` (chunk order)."""

    slide_id: str
    model: str
    chunk_ids: tuple[str, ...]
    row: dict[str, Any]  # the row that completed it (slide facts, tile count)


@dataclass(frozen=True)
class Failed:
    """(slide_id, model) failed; ``row`` carries ``stage``, ``error_type``, ``error_message``."""

    slide_id: str
    model: str
    row: dict[str, Any]


@dataclass
class _Pending:
    n_chunks: int
    chunk_ids: dict[int, str] = field(default_factory=dict)  # chunk_index -> staged chunk id


class CompletionTracker:
    """Feeds on result rows (``slide_id``, ``model``, ``chunk_index``, ``n_chunks``,
    ``chunk_id``, ``status``); :meth:`add` returns a decision or ``None``."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._decided: set[tuple[str, str]] = set()

    @property
    def in_flight(self) -> int:
        """(slide, model) pairs with some rows seen and no decision yet."""
        return len(self._pending)

    def add(self, row: dict[str, Any]) -> Complete | Failed | None:
        key = (row["slide_id"], row["model"])
        if key in self._decided:
            return None  # a retried task's duplicate, or a late chunk of a failed pair
        if row["status"] == "error":
            self._pending.pop(key, None)
            self._decided.add(key)
            return Failed(key[0], key[1], row)
        state = self._pending.setdefault(key, _Pending(n_chunks=row["n_chunks"]))
        state.chunk_ids[row["chunk_index"]] = row["chunk_id"]
        if len(state.chunk_ids) < max(state.n_chunks, 1):
            return None
        del self._pending[key]
        self._decided.add(key)
        ids = tuple(state.chunk_ids[i] for i in sorted(state.chunk_ids)) if state.n_chunks else ()
        return Complete(key[0], key[1], ids, row)
