import json

import pyarrow.parquet as pq
from PIL import Image

from pathray.cli import main
from pathray.tiling.grid import TILE_SCHEMA, TilingConfig


def test_tile_command_on_mixed_manifest(mixed_manifest, synthetic_svs_025, tmp_path):
    out = tmp_path / "out"
    code = main(["tile", str(mixed_manifest.path), "--out", str(out), "--geojson"])
    assert code == 1  # some slides are bad on purpose

    slides = {row["slide_id"]: row for row in pq.read_table(out / "slides.parquet").to_pylist()}
    got = {sid: (row["error_type"] if row["status"] == "error" else row["status"]) for sid, row in slides.items()}
    assert got == mixed_manifest.expected
    assert slides["no_mpp_overridden"]["mpp_source"] == "manifest"
    assert slides["missing"]["error_message"] and slides["good_025"]["error_type"] is None

    tiles = pq.read_table(out / "tiles.parquet")
    assert tiles.schema.remove_metadata() == TILE_SCHEMA
    meta = tiles.schema.metadata
    assert meta[b"pathray.tiling_fingerprint"].decode() == TilingConfig().fingerprint()
    rows = tiles.to_pylist()
    good = {(r["x"], r["y"]) for r in rows if r["slide_id"] == "good_025"}
    assert good == synthetic_svs_025.expected_tiles(0.5, 224)
    for sid, row in slides.items():
        assert row["n_tiles"] == sum(r["slide_id"] == sid for r in rows)

    for sid in ("good_025", "good_05", "no_mpp_overridden", "blank"):
        assert Image.open(out / "qc" / f"{sid}.png").size[0] >= 1024
    features = json.loads((out / "qc" / "good_025.geojson").read_text())["features"]
    assert len(features) == 10
    x, y = features[0]["geometry"]["coordinates"][0][0]
    assert (x, y) == (rows[0]["x"], rows[0]["y"]) and features[0]["properties"]["objectType"] == "tile"
    assert features[0]["geometry"]["coordinates"][0][2] == [x + 448.0, y + 448.0]


def test_tile_options_and_all_good_exit_code(synthetic_svs_05, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": str(synthetic_svs_05), "slide_id": "s"}) + "\n")
    code = main(
        [
            "tile",
            str(manifest),
            "--out",
            str(tmp_path / "o"),
            "--tile-px",
            "112",
            "--target-mpp",
            "1.0",
            "--stride-px",
            "56",
            "--min-tissue",
            "0.5",
        ]
    )
    assert code == 0
    tiles = pq.read_table(tmp_path / "o" / "tiles.parquet").to_pylist()
    assert tiles and all(t["tile_px"] == 112 and t["target_mpp"] == 1.0 and t["size_level0"] == 224.0 for t in tiles)
    assert all(t["tissue_fraction"] >= 0.5 for t in tiles)
    assert {t["x"] % 112 for t in tiles} == {0}  # stride 56 target px = 112 level-0 px


def test_invalid_manifest_exit_code(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\na/b,/x.svs\n")
    assert main(["tile", str(manifest), "--out", str(tmp_path / "o")]) == 2
    assert "row 1" in capsys.readouterr().err
