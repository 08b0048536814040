"""Slide labels from a table keyed by ``slide_id`` or by a kept manifest column (``case_id``).

A labels table is a CSV or Parquet file (or a ``pyarrow.Table``) with a label column and a
key column. Keyed by ``slide_id`` it labels slides directly; keyed by any other column
(e.g. ``case_id``) it labels every slide whose kept manifest column of that name matches,
so one patient-level label reaches all the patient's slides. Rows with a null label are
ignored; a key listed twice is an error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pathray.mil.bags import BagIndex

PATIENT_COLUMN = "case_id"


@dataclass(frozen=True)
class Labels:
    """A labels table and how it joins the store's slides (:func:`join_labels`)."""

    source: str | Path | pa.Table  # a .csv / .parquet path, or the table itself
    column: str = "label"  # the label column
    key: str | None = None  # the key column: slide_id when the table has it, else case_id

    @classmethod
    def of(cls, labels: str | Path | pa.Table | Labels) -> Labels:
        """``labels`` as given, or a table/path with the default label column and key."""
        return labels if isinstance(labels, Labels) else cls(labels)


@dataclass(frozen=True)
class SlideLabels:
    """Labels joined onto the store: ``labels`` slide_id -> class index into ``classes``;
    ``patients`` slide_id -> patient id (``case_id`` where known, else the slide id);
    ``unmatched``: label rows that matched no committed slide."""

    classes: list[Any]
    labels: dict[str, int]
    patients: dict[str, str]
    key: str
    patient_key: str
    unmatched: int


def read_labels(source: str | Path | pa.Table) -> pa.Table:
    """A labels table from a ``.csv``/``.parquet`` path, or the table itself. CSV columns
    named ``slide_id``/``case_id`` are read as strings."""
    if isinstance(source, pa.Table):
        return source
    path = Path(source)
    if path.suffix.lower() == ".csv":
        types = {name: pa.string() for name in ("slide_id", PATIENT_COLUMN)}
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    return pq.read_table(path)


def join_labels(index: BagIndex, table: pa.Table, label_column: str = "label", key: str | None = None) -> SlideLabels:
    """Join ``table`` onto the committed slides of ``index``. ``key`` defaults to
    ``slide_id`` when the table has it, else ``case_id``."""
    key = key or ("slide_id" if "slide_id" in table.column_names else PATIENT_COLUMN)
    for name, where in ((key, table.column_names), (label_column, table.column_names)):
        if name not in where:
            raise ValueError(f"labels table has no column {name!r} (columns: {table.column_names})")
    if key != "slide_id" and key not in index.slides.column_names:
        raise ValueError(
            f"the store's features files have no kept column {key!r} to join labels on; "
            f"kept columns: {index.slides.column_names[3:]}"
        )
    keys, values = table.column(key).to_pylist(), table.column(label_column).to_pylist()
    by_key = {str(k): v for k, v in zip(keys, values) if k is not None and v is not None}
    if len(by_key) != sum(k is not None and v is not None for k, v in zip(keys, values)):
        raise ValueError(f"labels table lists some {key} more than once")
    slide_key = (
        {s: str(v) for s, v in index.column(key).items()}
        if key != "slide_id"
        else {s: s for s in index.column("slide_id")}
    )
    matched = {s: by_key[k] for s, k in slide_key.items() if k in by_key}
    if not matched:
        raise ValueError(f"no committed slide of {index.model!r} matches a labelled {key}")
    classes = sorted(set(matched.values()))
    position = {c: i for i, c in enumerate(classes)}
    patients, patient_key = _patients(index, table, matched)
    unmatched = len(set(by_key) - {slide_key[s] for s in matched})
    return SlideLabels(
        classes, {s: position[c] for s, c in sorted(matched.items())}, patients, key, patient_key, unmatched
    )


def _patients(index: BagIndex, table: pa.Table, slides: dict[str, Any]) -> tuple[dict[str, str], str]:
    """Patient of each slide: its ``case_id`` in the store, else in the labels table (keyed by
    slide_id), else the slide itself; warns (naming them) when any slide is its own patient,
    as slides of one patient may then be split apart."""
    store_case = index.column(PATIENT_COLUMN) if PATIENT_COLUMN in index.slides.column_names else {}
    label_case = {}
    if {"slide_id", PATIENT_COLUMN} <= set(table.column_names):
        label_case = dict(zip(table.column("slide_id").to_pylist(), table.column(PATIENT_COLUMN).to_pylist()))
    patients, alone = {}, []
    for s in slides:
        case = store_case.get(s)
        case = label_case.get(s) if case is None else case
        patients[s] = s if case is None else str(case)
        if case is None:
            alone.append(s)
    if alone:
        warnings.warn(
            f"{len(alone)} of {len(slides)} labelled slides have no {PATIENT_COLUMN} (neither a kept column "
            f"of their features files nor in the labels table), so each is taken as its own patient and "
            f"slides of one patient can land in different splits: {', '.join(sorted(alone)[:10])}"
            f"{' ...' if len(alone) > 10 else ''}. Add {PATIENT_COLUMN} to the labels table.",
            PatientFallbackWarning,
            stacklevel=3,
        )
    return patients, PATIENT_COLUMN if len(alone) < len(slides) else "slide_id"


class PatientFallbackWarning(UserWarning):
    """Some slides have no patient id and are split as their own patient."""


def read_joined(index: BagIndex, labels: Labels) -> SlideLabels:
    """Read ``labels.source`` and join it onto the committed slides of ``index``."""
    return join_labels(index, read_labels(labels.source), labels.column, labels.key)
