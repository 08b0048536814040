"""IDC manifests against the real index shipped in ``idc-index-data`` (no network)."""

from __future__ import annotations

import re

import duckdb
import pyarrow.parquet as pq
import pytest

from pathray import cli
from pathray.idc import (
    IdcSelection,
    idc_manifest,
    index_path,
    manifest_row,
    read_sm_series,
    slide_id_for,
)
from pathray.job.estimate import estimate_tiles, grid_tiles
from pathray.manifest import check_safe_name, read_manifest

pytest.importorskip("idc_index_data")

COLLECTIONS = ("tcga_luad", "tcga_lusc", "tcga_brca", "cptac_luad")
SERIES_PREFIX = re.compile(r"^s3://idc-open-data/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/$")


def _sql(query: str, *params) -> list[tuple]:
    with duckdb.connect() as con:
        return con.execute(query.replace("IDX", "read_parquet(?)"), [index_path(), *params]).fetchall()


def _counts(table) -> dict[str, int]:
    cohorts = table.column("cohort").to_pylist()
    return {c: cohorts.count(c) for c in set(cohorts)}


def test_counts_per_collection_equal_the_index_sql():
    table, counts = idc_manifest(IdcSelection(COLLECTIONS))
    expected = dict(
        _sql(
            "SELECT collection_id, count(*) FROM IDX WHERE Modality = 'SM' "
            "AND list_contains(?, collection_id) GROUP BY collection_id",
            list(COLLECTIONS),
        )
    )
    assert _counts(table) == expected
    assert {c: s["series"] for c, s in counts.items()} == expected
    sizes = dict(
        _sql("SELECT SeriesInstanceUID, series_size_MB FROM IDX WHERE Modality = 'SM' AND collection_id = 'tcga_luad'")
    )
    luad = [r for r in table.to_pylist() if r["cohort"] == "tcga_luad"]
    assert {r["series_instance_uid"]: r["series_size_mb"] for r in luad} == sizes


def test_diagnostic_and_frozen_filters_equal_the_index_sql():
    diagnostic, _ = idc_manifest(IdcSelection(COLLECTIONS, diagnostic_only=True))
    frozen, counts = idc_manifest(IdcSelection(COLLECTIONS, preparation="frozen"))
    expect_dx = dict(
        _sql(
            "SELECT collection_id, count(*) FROM IDX WHERE Modality = 'SM' AND list_contains(?, collection_id) "
            "AND regexp_matches(SeriesDescription, '^FFPE\\s.*\\sDX[0-9A-Z]*\\s*$', 'i') GROUP BY 1",
            list(COLLECTIONS),
        )
    )
    expect_frozen = dict(
        _sql(
            "SELECT collection_id, count(*) FROM IDX WHERE Modality = 'SM' "
            "AND list_contains(?, collection_id) AND regexp_matches(SeriesDescription, "
            "'^Frozen\\s.*\\s[A-Z]{2}[0-9A-Z]*\\s*$', 'i') GROUP BY 1",
            list(COLLECTIONS),
        )
    )
    assert _counts(diagnostic) == expect_dx and "cptac_luad" not in expect_dx
    assert _counts(frozen) == expect_frozen
    assert set(diagnostic.column("series_description").to_pylist()) >= {"FFPE HE TP DX1"}
    assert counts["cptac_luad"]["unclassified"] == counts["cptac_luad"]["series"] > 0


def test_every_sm_series_gets_a_unique_safe_id_and_a_well_formed_prefix():
    collections = [c for (c,) in _sql("SELECT DISTINCT collection_id FROM IDX WHERE Modality = 'SM'")]
    rows = [manifest_row(r) for r in read_sm_series(collections)]
    assert len(rows) == _sql("SELECT count(*) FROM IDX WHERE Modality = 'SM'")[0][0]
    ids = [r["slide_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for row in rows:
        check_safe_name(row["slide_id"])
        assert SERIES_PREFIX.match(row["path"]), row["path"]


def test_slide_id_rule_is_readable_and_stable():
    slide_id = slide_id_for("TCGA-05-4244", "FFPE HE TP DX1", "1.2.3.4")
    assert re.fullmatch(r"TCGA-05-4244_FFPE-HE-TP-DX1_[0-9a-f]{8}", slide_id)
    assert slide_id == slide_id_for("TCGA-05-4244", "FFPE HE TP DX1", "1.2.3.4")
    assert slide_id != slide_id_for("TCGA-05-4244", "FFPE HE TP DX1", "1.2.3.5")
    assert slide_id_for("P1", None, "9").startswith("P1_SM_")


def test_cli_writes_a_manifest_pathray_reads(tmp_path, capsys):
    out = tmp_path / "luad.parquet"
    assert cli.main(["manifest", "idc", "--collection", "tcga_luad", "--diagnostic-only", "--out", str(out)]) == 0
    entries = read_manifest(str(out))
    expected = _sql(
        "SELECT count(*) FROM IDX WHERE Modality = 'SM' AND collection_id = 'tcga_luad' "
        "AND regexp_matches(SeriesDescription, '^FFPE\\s.*\\sDX[0-9A-Z]*\\s*$', 'i')"
    )[0][0]
    assert len(entries) == expected > 0
    assert {e.cohort for e in entries} == {"tcga_luad"}
    assert all(e.extra["case_id"].startswith("TCGA-") and e.extra["license"].startswith("CC BY") for e in entries)
    assert pq.read_schema(out).names[:4] == ["slide_id", "path", "cohort", "case_id"]
    assert f"{expected} of" in capsys.readouterr().out


def test_cli_unknown_collection_exits_2(tmp_path, capsys):
    assert cli.main(["manifest", "idc", "--collection", "tcga_nope", "--out", str(tmp_path / "m.parquet")]) == 2
    assert "tcga_nope" in capsys.readouterr().err


def test_estimate_tiles_matches_the_planned_grid(synthetic_svs_025, tmp_path):
    """Grid size from a DICOM series' own header geometry equals what plan_tiles grids on the slide."""
    from pathray.demo.dicomize import write_dicom_series
    from pathray.tiling.grid import TilingConfig, plan_tiles
    from pathray.wsi.dicom import open_dicom_series
    from pathray.wsi.slide import open_slide

    backend = open_dicom_series(str(write_dicom_series(synthetic_svs_025, tmp_path / "s", "jpeg").directory))
    width, height = backend.level_dimensions[0]
    rows = [
        {
            "slide_id": "a",
            "width_px": width,
            "height_px": height,
            "index_mpp": float(backend.properties["openslide.mpp-x"]),
        },
        {"slide_id": "no-geometry"},
    ]
    with open_slide(str(synthetic_svs_025)) as slide:
        for tile_px, target_mpp, stride in ((224, 0.5, None), (256, 1.0, None), (224, 0.25, None), (224, 0.5, 112)):
            config = TilingConfig(tile_px=tile_px, target_mpp=target_mpp, stride_px=stride)
            cols, nrows = plan_tiles(slide, "a", config).grid_shape
            estimate = estimate_tiles(rows, tile_px, target_mpp, stride)
            assert estimate.grid_tiles == cols * nrows == grid_tiles(width, height, 0.25, tile_px, target_mpp, stride)
            assert estimate.slides_counted == 1 and estimate.rows_without_geometry == ("no-geometry",)


def test_embed_s3_anonymous_flag_sets_unsigned_slide_storage_options_only():
    import argparse

    from pathray.cli import embed as cli_embed

    parser = argparse.ArgumentParser()
    cli_embed.configure(parser)
    raw = cli_embed.raw_config(
        parser.parse_args(
            [
                "--manifest",
                "m.parquet",
                "--models",
                "uni2-h",
                "--out",
                "o",
                "--s3-endpoint-url",
                "http://s3.local",
                "--s3-anonymous",
            ]
        )
    )
    assert raw["slide_storage_options"] == {"anon": True}  # slides unsigned, from AWS: not the store's endpoint
    assert raw["storage_options"]["client_kwargs"]["endpoint_url"] == "http://s3.local"
    assert "anon" not in raw["storage_options"]  # manifest and store keep their credentials
    assert "slide_storage_options" not in cli_embed.raw_config(
        parser.parse_args(["--manifest", "m.parquet", "--models", "x"])
    )


def test_sm_index_geometry_joins_onto_the_manifest_and_feeds_the_estimate(tmp_path):
    """Columns named as in the shipped sm_index schema; the joined sizes drive estimate_tiles."""
    import json
    from pathlib import Path

    import idc_index_data
    import pyarrow as pa

    from pathray.idc import SM_INDEX_GEOMETRY, attach_geometry

    schema_names = {
        c["name"]
        for c in json.loads((Path(idc_index_data.__file__).parent / "sm_index_schema.json").read_text())["columns"]
    }
    needed = {"SeriesInstanceUID", "max_TotalPixelMatrixColumns", "max_TotalPixelMatrixRows", "min_PixelSpacing_2sf"}
    assert needed <= schema_names
    assert all(expr.split()[0] in schema_names for expr in SM_INDEX_GEOMETRY.values())
    table, _ = idc_manifest(IdcSelection(("tcga_luad",), diagnostic_only=True))
    first, second = table.column("series_instance_uid").to_pylist()[:2]
    sm_index = tmp_path / "sm_index.parquet"
    pq.write_table(
        pa.table(
            {
                "SeriesInstanceUID": [first, "1.2.unrelated"],
                "max_TotalPixelMatrixColumns": [4096, 10],
                "max_TotalPixelMatrixRows": [3072, 10],
                "min_PixelSpacing_2sf": [0.00025, 0.001],
            }
        ),
        sm_index,
    )
    rows = attach_geometry(table, str(sm_index)).to_pylist()
    by_uid = {r["series_instance_uid"]: r for r in rows}
    assert (by_uid[first]["width_px"], by_uid[first]["height_px"]) == (4096, 3072)
    assert by_uid[first]["index_mpp"] == pytest.approx(0.25)
    assert by_uid[second]["width_px"] is None
    estimate = estimate_tiles(rows, 224, 0.5)
    assert estimate.grid_tiles == grid_tiles(4096, 3072, 0.25, 224, 0.5) == 9 * 6
    assert estimate.slides_counted == 1 and len(estimate.rows_without_geometry) == len(rows) - 1
