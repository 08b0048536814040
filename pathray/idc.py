"""Manifests of slide-microscopy series from NCI's Imaging Data Commons (IDC), offline.

The series list comes from ``idc_index.parquet``, the index shipped inside the PyPI wheel
``idc-index-data`` (extra ``pathray[idc]``, pinned): no network is needed to build a
manifest. Only rows with ``Modality = 'SM'`` (DICOM slide microscopy) are used.

Manifest columns (one row per DICOM series = one slide):

``slide_id``
    ``<PatientID>_<SeriesDescription>_<first 8 hex digits of sha1(SeriesInstanceUID)>``, where the
    description has runs of characters outside ``[A-Za-z0-9-]`` replaced by ``-`` (``FFPE
    HE TP DX1`` → ``FFPE-HE-TP-DX1``); an empty description gives ``SM``. The suffix comes
    from the DICOM SeriesInstanceUID (hashed: UIDs' own tails repeat across series), which IDC
    never changes (the bucket uuid
    ``crdc_series_uuid`` does change when IDC revises a series), so the id is stable across
    IDC releases. Unique over every SM series of the shipped index (tested).
``path``
    The series prefix: ``s3://<aws_bucket>/<crdc_series_uuid>/`` (the index's
    ``series_aws_url`` without its trailing ``*``); each ``.dcm`` under it is one instance.
``cohort`` = ``collection_id``; ``case_id`` = ``PatientID``; kept columns ``license``
(``license_short_name``: CC BY 3.0 / 4.0 — keep it with the embeddings), ``transfer_syntax``
(``transfer_syntax_name``; several instances may use different ones), ``series_size_mb``,
``source_doi``, ``series_instance_uid``, ``series_description``, ``preparation``,
``slide_type``.

Preparation and diagnostic filters use the index's own ``SeriesDescription``. TCGA writes
``<FFPE|Frozen> <stain> <sample type> <slide code>`` (e.g. ``FFPE HE TP DX1``): ``preparation``
is ``ffpe`` / ``frozen`` from the first word (else null) and ``slide_type`` is the slide
code's two letters (``DX`` diagnostic, ``TS``/``BS``/``MS`` frozen top/bottom/middle; else
null). *Diagnostic* means ``preparation == 'ffpe' and slide_type == 'DX'``. Collections whose
descriptions carry neither (CPTAC: ``HE tumor``...) have null fields and are dropped by these
filters; :func:`idc_manifest` reports them rather than guessing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

SM_MODALITY = "SM"
UID_HASH_CHARS = 8
PREPARATIONS = ("ffpe", "frozen")
_DESCRIPTION_JUNK = re.compile(r"[^A-Za-z0-9-]+")
_TCGA_DESCRIPTION = re.compile(r"^(?P<prep>FFPE|Frozen)\s.*\s(?P<code>[A-Z]{2})[0-9A-Z]*\s*$", re.IGNORECASE)

#: manifest column -> index SQL expression (DuckDB over idc_index.parquet)
INDEX_COLUMNS: dict[str, str] = {
    "collection_id": "collection_id",
    "PatientID": "PatientID",
    "SeriesInstanceUID": "SeriesInstanceUID",
    "SeriesDescription": "SeriesDescription",
    "aws_bucket": "aws_bucket",
    "crdc_series_uuid": "crdc_series_uuid",
    "series_aws_url": "series_aws_url",
    "license_short_name": "license_short_name",
    "transfer_syntax_name": "transfer_syntax_name",
    "series_size_MB": "series_size_MB",
    "source_DOI": "source_DOI",
}

MANIFEST_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("path", pa.string()),
        ("cohort", pa.string()),
        ("case_id", pa.string()),
        ("license", pa.string()),
        ("transfer_syntax", pa.string()),
        ("series_size_mb", pa.float64()),
        ("source_doi", pa.string()),
        ("series_instance_uid", pa.string()),
        ("series_description", pa.string()),
        ("preparation", pa.string()),
        ("slide_type", pa.string()),
    ]
)


@dataclass(frozen=True)
class IdcSelection:
    """Which series to take. ``collections`` are IDC ``collection_id`` values (``tcga_luad``);
    ``preparation`` one of :data:`PREPARATIONS` or ``None`` (any)."""

    collections: tuple[str, ...]
    diagnostic_only: bool = False
    preparation: str | None = None

    def __post_init__(self) -> None:
        if not self.collections:
            raise ValueError("give at least one collection (e.g. tcga_luad)")
        if self.preparation is not None and self.preparation not in PREPARATIONS:
            raise ValueError(f"preparation must be one of {PREPARATIONS}, not {self.preparation!r}")


def index_path() -> str:
    """Path of ``idc_index.parquet`` inside the installed ``idc-index-data`` wheel."""
    try:
        import idc_index_data
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("IDC manifests need the 'idc' extra: pip install 'pathray[idc]'") from exc
    return str(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)


def index_version() -> str:
    """Version of the installed ``idc-index-data`` (which IDC release the manifest reflects)."""
    import idc_index_data

    return str(idc_index_data.__version__)


def read_sm_series(collections: Sequence[str], parquet: str | None = None) -> list[dict]:
    """Index rows (columns :data:`INDEX_COLUMNS`) of the SM series of ``collections``, ordered
    by collection, patient and SeriesInstanceUID. Unknown collection names raise ``ValueError``."""
    import duckdb

    source = parquet or index_path()
    con = duckdb.connect()
    try:
        known = {
            r[0]
            for r in con.execute(
                "SELECT DISTINCT collection_id FROM read_parquet(?) WHERE Modality = ?", [source, SM_MODALITY]
            ).fetchall()
        }
        unknown = sorted(set(collections) - known)
        if unknown:
            raise ValueError(
                f"no slide-microscopy series in IDC for collection(s) {unknown}; "
                f"e.g. {sorted(c for c in known if c.startswith('tcga'))[:5]}"
            )
        select = ", ".join(f"{expr} AS {name}" for name, expr in INDEX_COLUMNS.items())
        cursor = con.execute(
            f"SELECT {select} FROM read_parquet(?) WHERE Modality = ? AND list_contains(?, collection_id) "
            "ORDER BY collection_id, PatientID, SeriesInstanceUID",
            [source, SM_MODALITY, list(collections)],
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        con.close()


def classify(description: str | None) -> tuple[str | None, str | None]:
    """``(preparation, slide_type)`` from a SeriesDescription (see the module doc)."""
    match = _TCGA_DESCRIPTION.match(description or "")
    if match is None:
        return None, None
    return match["prep"].lower(), match["code"].upper()


def slide_id_for(patient_id: str, description: str | None, series_uid: str) -> str:
    """The manifest's ``slide_id`` rule (module doc): patient, cleaned description, UID suffix."""
    desc = _DESCRIPTION_JUNK.sub("-", description or "").strip("-") or "SM"
    patient = _DESCRIPTION_JUNK.sub("-", patient_id).strip("-")
    return f"{patient}_{desc}_{hashlib.sha1(series_uid.encode()).hexdigest()[:UID_HASH_CHARS]}"


def series_prefix(row: dict) -> str:
    """``s3://<bucket>/<crdc_series_uuid>/`` for one index row; checked against ``series_aws_url``."""
    prefix = f"s3://{row['aws_bucket']}/{row['crdc_series_uuid']}/"
    if row["series_aws_url"] != prefix + "*":
        raise ValueError(
            f"index row {row['SeriesInstanceUID']}: series_aws_url {row['series_aws_url']!r} is not {prefix + '*'!r}"
        )
    return prefix


def manifest_row(row: dict) -> dict:
    """One manifest row (:data:`MANIFEST_SCHEMA`) from one index row."""
    preparation, slide_type = classify(row["SeriesDescription"])
    return {
        "slide_id": slide_id_for(row["PatientID"], row["SeriesDescription"], row["SeriesInstanceUID"]),
        "path": series_prefix(row),
        "cohort": row["collection_id"],
        "case_id": row["PatientID"],
        "license": row["license_short_name"],
        "transfer_syntax": row["transfer_syntax_name"],
        "series_size_mb": row["series_size_MB"],
        "source_doi": row["source_DOI"],
        "series_instance_uid": row["SeriesInstanceUID"],
        "series_description": row["SeriesDescription"],
        "preparation": preparation,
        "slide_type": slide_type,
    }


def selected(row: dict, selection: IdcSelection) -> bool:
    """Whether a manifest row passes ``selection``'s preparation / diagnostic filters."""
    if selection.diagnostic_only and not (row["preparation"] == "ffpe" and row["slide_type"] == "DX"):
        return False
    return selection.preparation is None or row["preparation"] == selection.preparation


def idc_manifest(selection: IdcSelection, parquet: str | None = None) -> tuple[pa.Table, dict[str, dict[str, int]]]:
    """The manifest table for ``selection`` and per-collection counts
    ``{collection: {"series": n_in_index, "kept": n_kept, "unclassified": n_without_prep}}``."""
    rows = [manifest_row(r) for r in read_sm_series(selection.collections, parquet)]
    counts = {c: {"series": 0, "kept": 0, "unclassified": 0} for c in selection.collections}
    kept = []
    for row in rows:
        stats = counts[row["cohort"]]
        stats["series"] += 1
        stats["unclassified"] += row["preparation"] is None
        if selected(row, selection):
            stats["kept"] += 1
            kept.append(row)
    return pa.Table.from_pylist(kept, schema=MANIFEST_SCHEMA), counts


#: geometry columns of IDC's ``sm_index.parquet`` (not shipped in the idc-index-data wheel; the
#: ``idc-index`` package downloads it) -> manifest column, with the µm/px conversion in SQL
SM_INDEX_GEOMETRY = {
    "width_px": "max_TotalPixelMatrixColumns",
    "height_px": "max_TotalPixelMatrixRows",
    "index_mpp": "min_PixelSpacing_2sf * 1000.0",  # mm/px at 2 significant figures -> µm/px
}


def attach_geometry(table: pa.Table, sm_index_parquet: str) -> pa.Table:
    """``table`` plus ``width_px``, ``height_px`` (level-0 px) and ``index_mpp`` (µm/px, 2 s.f.) joined
    from an IDC ``sm_index.parquet`` on SeriesInstanceUID; null where the series is not in it."""
    import duckdb

    select = ", ".join(f"{expr} AS {name}" for name, expr in SM_INDEX_GEOMETRY.items())
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT SeriesInstanceUID, {select} FROM read_parquet(?)", [sm_index_parquet]).fetchall()
    by_uid = {row[0]: row[1:] for row in rows}
    uids = table.column("series_instance_uid").to_pylist()
    kinds = (pa.int64(), pa.int64(), pa.float64())
    for k, (name, kind) in enumerate(zip(SM_INDEX_GEOMETRY, kinds)):
        values = [by_uid[uid][k] if uid in by_uid else None for uid in uids]
        table = table.append_column(pa.field(name, kind), pa.array(values, kind))
    return table


def write_manifest(table: pa.Table, uri: str, storage_options: dict | None = None) -> None:
    """Write a manifest as Parquet, or CSV when ``uri`` ends in ``.csv`` (local or ``s3://``)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pathray.fs import split_uri

    fs, path = split_uri(uri, storage_options)
    if not uri.startswith("s3://"):
        fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        if uri.lower().endswith(".csv"):
            pacsv.write_csv(table, f)
        else:
            pq.write_table(table, f)
