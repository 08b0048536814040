"""The job's stages as plain callables, chained by hand on real slides (no Ray)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet  # noqa: F401  (pa.parquet)

from pathray.job.rows import SLIDE_SCHEMA, chunk_id
from pathray.job.stages import ChunkEncoder, ChunkReader, ChunkWriter, SlidePlanner, tile_batches
from pathray.store import FeatureStore
from pathray.testing import SleepEncoder, pixel_statistics
from pathray.tiling.grid import TilingConfig, plan_tiles, read_tiles
from pathray.wsi.slide import open_slide

TILING = TilingConfig(tile_px=224, target_mpp=0.5)


def test_tile_batches_are_zero_copy_views_of_each_row():
    rows = [np.full((n, 4, 4, 3), n, np.uint8) for n in (1, 2, 3)]
    table = pa.table({"pixels": pa.array([r.tobytes() for r in rows], type=pa.large_binary())}).slice(1)
    views = tile_batches(table.column("pixels"), [4] * table.num_rows)
    assert [v.shape[0] for v in views] == [2, 3]
    for view, want in zip(views, rows[1:]):
        np.testing.assert_array_equal(view, want)
        assert not view.flags.owndata and not view.flags.writeable


def test_stages_chained_by_hand_equal_tiler_plus_encoder(synthetic_svs_025, tmp_path):
    slides = pa.Table.from_pylist(
        [
            {
                "slide_id": "a",
                "path": os.fspath(synthetic_svs_025),
                "cohort": "c",
                "mpp_override": None,
                "models": ["m1", "m2"],
            },
            {
                "slide_id": "gone",
                "path": str(tmp_path / "gone.svs"),
                "cohort": "c",
                "mpp_override": None,
                "models": ["m1", "m2"],
            },
        ],
        schema=SLIDE_SCHEMA,
    )
    chunks = SlidePlanner(TILING, chunk_tiles=4)(slides)
    ok = chunks.filter(pa.compute.equal(chunks.column("status"), "ok"))
    assert ok.column("chunk_id").to_pylist() == [chunk_id("a", TILING.fingerprint(), i) for i in range(3)]  # 10 tiles
    gone = chunks.filter(pa.compute.equal(chunks.column("slide_id"), "gone")).to_pylist()[0]
    assert (gone["status"], gone["error_type"], gone["n_chunks"]) == ("error", "slide_not_found", 0)

    reader = ChunkReader(TILING)
    read = pa.concat_tables(list(reader(chunks)))
    assert read.column("tiles_read").to_pylist()[:3] == [4, 4, 2]
    encoded = ChunkEncoder("m1", lambda: SleepEncoder(1e6, 6), drop_pixels=False)(read)
    # m2 is stored as float16 while its encoder returns float32: the encode stage casts
    encoded = ChunkEncoder("m2", lambda: SleepEncoder(1e6, 3), drop_pixels=True, output_dtype="float16")(encoded)
    assert "pixels" not in encoded.column_names
    results = ChunkWriter(str(tmp_path / "store"), None, ["m1", "m2"], {"m1": "float32", "m2": "float16"})(encoded)
    assert len(results) == 2 * len(chunks)  # one row per (chunk, model)
    assert [r["first"] for r in results.to_pylist()] == [True, False] * len(chunks)
    reader.close()

    with open_slide(os.fspath(synthetic_svs_025)) as slide:
        grid = plan_tiles(slide, "a", TILING)
        tiles = read_tiles(slide, TILING, grid.x, grid.y)
    store = FeatureStore(str(tmp_path / "store"))
    staged = [pa.parquet.read_table(store.staging_path("m1", "a", cid)) for cid in ok.column("chunk_id").to_pylist()]
    table = pa.concat_tables(staged)
    np.testing.assert_array_equal(table.column("x").to_numpy(), grid.x)
    np.testing.assert_allclose(
        np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), pixel_statistics(tiles, 6), rtol=1e-6
    )
    m2 = pa.parquet.read_table(store.staging_path("m2", "a", ok.column("chunk_id")[0].as_py()))
    assert m2.schema.field("embedding").type == pa.list_(pa.float16(), 3)  # not 6 half-floats read from 3 floats
    meta = json.loads(ok.column("slide_facts")[0].as_py())
    assert (meta["width"], meta["height"], meta["mpp"]) == (4096, 3072, 0.25)


def test_encoder_that_cannot_load_fails_its_model_only(synthetic_svs_05):
    slides = pa.Table.from_pylist(
        [{"slide_id": "b", "path": os.fspath(synthetic_svs_05), "cohort": "", "mpp_override": None, "models": ["bad"]}],
        schema=SLIDE_SCHEMA,
    )
    read = pa.concat_tables(list(ChunkReader(TILING)(SlidePlanner(TILING, chunk_tiles=8)(slides))))

    def broken():
        raise FileNotFoundError("no weights here")

    out = ChunkEncoder("bad", broken, drop_pixels=True)(read)
    errors = [json.loads(e) for e in out.column("err:bad").to_pylist()]
    assert {e["error_type"] for e in errors} == {"unexpected_error"} and {e["stage"] for e in errors} == {"encode"}
    assert errors[0]["error_message"] == "FileNotFoundError: no weights here"
