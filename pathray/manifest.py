"""Read and validate slide manifests (CSV, TSV, Parquet, JSONL; local or ``s3://``).

Columns: ``path`` (required: local path, ``file://`` or ``s3://`` URI; a relative path is
taken relative to the manifest's own directory or S3 prefix), ``slide_id``
(default: the file stem), ``mpp`` (optional override, µm/px), ``cohort`` (optional); every
other column is carried through untouched in :attr:`SlideEntry.extra`.

All rows are validated before anything runs and every problem is reported at once in one
:class:`~pathray.errors.ManifestError`, each prefixed with its 1-based data row number.
Missing slide files are not manifest problems: they surface later as per-slide errors.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pathray.errors import ManifestError, UnsafeIdError
from pathray.fs import split_uri

MAX_NAME_LENGTH = 200
KNOWN_COLUMNS = ("path", "slide_id", "mpp", "cohort")


@dataclass(frozen=True)
class SlideEntry:
    """One manifest row. ``mpp`` is the manifest's µm/px override (``None`` = use the slide's)."""

    slide_id: str
    path: str
    mpp: float | None
    cohort: str | None
    extra: dict[str, object] = field(default_factory=dict)
    row: int = 0  # 1-based data row number in the manifest


def check_safe_name(value: str, what: str = "slide_id") -> None:
    """Raise :class:`UnsafeIdError` unless ``value`` is safe as one file or partition name.

    Unsafe: empty, longer than 200 characters, containing ``/``, ``\\``, ``..`` or a
    control character, or starting with a dot or an underscore (pyarrow, DuckDB and polars
    skip such files: the slide's features would be invisible to plain readers).
    """
    if not isinstance(value, str) or value == "":
        raise UnsafeIdError(f"{what} is empty")
    if len(value) > MAX_NAME_LENGTH:
        raise UnsafeIdError(f"{what} {value[:40]!r}... is longer than {MAX_NAME_LENGTH} characters")
    if "/" in value or "\\" in value:
        raise UnsafeIdError(f"{what} {value!r} contains a path separator")
    if ".." in value:
        raise UnsafeIdError(f"{what} {value!r} contains '..'")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UnsafeIdError(f"{what} {value!r} contains a control character")
    if value.startswith((".", "_")):
        raise UnsafeIdError(f"{what} {value!r} starts with {value[0]!r}: readers skip such files")


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> list[SlideEntry]:
    """Read and validate a manifest; raise :class:`ManifestError` listing every problem."""
    try:
        rows = _read_rows(uri, storage_options)
    except ManifestError:
        raise
    except Exception as exc:  # unreadable for any reason: missing, permissions, bad syntax
        raise ManifestError([f"cannot read manifest {uri!r}: {type(exc).__name__}: {exc}"]) from exc
    if not rows:
        raise ManifestError([f"manifest {uri!r} has no rows"])
    if not any("path" in r for r in rows):
        raise ManifestError([f"manifest {uri!r} has no 'path' column"])

    problems: list[str] = []
    entries: list[SlideEntry] = []
    first_row_of: dict[str, int] = {}
    base = _base_of(uri)
    for number, raw in enumerate(rows, start=1):
        entry, row_problems = _parse_row(number, raw, base)
        problems += [f"row {number}: {p}" for p in row_problems]
        if entry is None:
            continue
        if entry.slide_id in first_row_of:
            problems.append(
                f"row {number}: duplicate slide_id {entry.slide_id!r} (first at row {first_row_of[entry.slide_id]})"
            )
        else:
            first_row_of[entry.slide_id] = number
        entries.append(entry)
    if problems:
        raise ManifestError(problems)
    return entries


def _base_of(uri: str) -> str:
    """Directory (or S3 prefix) of the manifest, ending in '/'."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.rsplit("/", 1)[0] + "/"
    return os.path.dirname(os.path.abspath(uri.removeprefix("file://"))) + os.sep


def _parse_row(number: int, raw: dict[str, Any], base: str) -> tuple[SlideEntry | None, list[str]]:
    problems: list[str] = []
    path = _clean(raw.get("path"))
    if path is None:
        return None, ["empty path"]
    if "://" not in path and not os.path.isabs(path):
        path = base + path
    slide_id = _clean(raw.get("slide_id"))
    if slide_id is None:
        slide_id = _stem(path)
    try:
        check_safe_name(slide_id, "slide_id")
    except UnsafeIdError as exc:
        problems.append(str(exc))
    cohort = _clean(raw.get("cohort"))
    if cohort is not None:
        try:
            check_safe_name(cohort, "cohort")
        except UnsafeIdError as exc:
            problems.append(str(exc))
    mpp: float | None = None
    mpp_raw = _clean(raw.get("mpp"))
    if mpp_raw is not None:
        try:
            mpp = float(mpp_raw)
            if not math.isfinite(mpp) or mpp <= 0:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"mpp {mpp_raw!r} is not a positive number (µm/px)")
            mpp = None
    extra = {k: v for k, v in raw.items() if k not in KNOWN_COLUMNS}
    return SlideEntry(slide_id=slide_id, path=path, mpp=mpp, cohort=cohort, extra=extra, row=number), problems


def _clean(value: Any) -> str | None:
    """Missing/NaN/blank -> None, else the value as a stripped string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def _read_rows(uri: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    fs, path = split_uri(uri, storage_options)
    lower = path.lower()
    with fs.open(path, "rb") as f:
        data = f.read()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8-sig")
    if lower.endswith((".jsonl", ".ndjson")):
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ManifestError([f"line {line_no}: invalid JSON: {exc}"]) from exc
                if not isinstance(row, dict):
                    raise ManifestError([f"line {line_no}: expected a JSON object"])
                rows.append(row)
        return rows
    if lower.endswith((".csv", ".tsv", ".tab", ".txt")):
        import csv

        delimiter = "," if lower.endswith(".csv") else "\t"
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
        return [{k.strip(): v for k, v in row.items() if k is not None} for row in reader]
    raise ManifestError([f"unsupported manifest extension for {uri!r}: use .csv, .tsv, .parquet or .jsonl"])
