"""TITAN slide encoder (pathray.slide_level.encoders.titan) and the `titan` aggregator.

**Frozen official outputs** (``tests/data/titan_golden.npz``), written by
``tests/reference/titan_golden.py``: the official TITAN code (``modeling_titan.py`` +
``vision_transformer.py`` of clemsgrs/unicorn_baseline, the MahmoodLab/TITAN hub code without
its text tower, commit recorded in the file) run in fp32 on CPU with ``random_titan_net(seed)``
weights written in the release layout and loaded strictly, calling
``encode_slide_from_patch_features(features, coords, patch_size_lv0)`` on synthetic slides at
0.25, 0.2631 and 0.5 µm/px (gaps, offsets, a 1 x 700 strip, an all-zero tile) with coordinates
as TRIDENT writes them (``(i, j) * patch_size_level0``), and on tiles sharing grid cells. Here the
same weights are regenerated from the seed (their sha256 digest checked against the file) and
pathray's encoder is fed *pathray's* level-0 coordinates and the slide's µm/px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file, save_file

from pathray.demo.synthetic import write_synthetic_svs
from pathray.errors import (
    SlideTooLargeForEncoderError,
    WeightsCorruptError,
    WeightsMismatchError,
    WeightsUnavailableError,
    describe,
)
from pathray.job.config import tiling_record
from pathray.slide_level.aggregators import AGGREGATORS, get_aggregator
from pathray.slide_level.encoders.titan import (
    TEXT_PART_STANDIN,
    TitanSlideEncoder,
    official_cells,
    random_titan_net,
    read_vision_part,
    state_digest,
    titan_cells,
    write_random_weights,
)
from pathray.slide_level.encoders.titan_net import TitanSlideNet, alibi_slopes
from pathray.slide_level.job import AggregateConfig, run_aggregate
from pathray.slide_level.stages import SlideAggregatorStage
from pathray.store import FeatureStore
from pathray.tiling.grid import TilingConfig, plan_tiles
from pathray.wsi.slide import open_slide

GOLDEN = Path(__file__).parent / "data" / "titan_golden.npz"
TOL = 1e-5
SLIDES = ["mpp025", "mpp02631", "mpp05_long"]


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def weights_file(golden, tmp_path_factory) -> Path:
    path = write_random_weights(tmp_path_factory.mktemp("titan"), seed=int(golden["weights_seed"]))
    assert state_digest(read_vision_part(path)) == str(golden["weights_digest"])  # the golden run's weights
    return path


@pytest.fixture(scope="module")
def encoder(weights_file) -> TitanSlideEncoder:
    torch.set_num_threads(1)
    return TitanSlideEncoder.from_weights(str(weights_file))


def golden_tiles(golden, tag) -> np.ndarray:
    n = len(golden[f"{tag}_x"])
    tiles = (np.random.default_rng(int(golden[f"{tag}_tiles_seed"])).random((n, 768)) * 2 - 1).astype(np.float32)
    tiles[golden[f"{tag}_zero_rows"]] = 0
    np.testing.assert_array_equal(tiles[0, :8], golden[f"{tag}_tiles_head"])  # same generator stream as then
    return tiles


# --- equality with the official code --------------------------------------------------------
@pytest.mark.parametrize("tag", SLIDES)
def test_matches_the_official_outputs_from_pathray_coordinates(golden, encoder, tag):
    tiles, x, y, mpp = golden_tiles(golden, tag), golden[f"{tag}_x"], golden[f"{tag}_y"], float(golden[f"{tag}_mpp"])
    got = encoder(tiles, x, y, mpp)
    assert got.shape == (768,) and got.dtype == np.float32
    assert np.abs(got - golden[f"{tag}_embedding"]).max() <= TOL
    with torch.inference_mode():  # attention in chunks of a few query rows: same result
        chunked = encoder.net(torch.from_numpy(tiles), torch.from_numpy(titan_cells(x, y, mpp)), chunk_bytes=200_000)
    assert np.abs(chunked.numpy() - golden[f"{tag}_embedding"]).max() <= TOL


@pytest.mark.parametrize("tag", [*SLIDES, "shared_cells"])
def test_official_entry_point_semantics(golden, encoder, tag):
    """TRIDENT coordinates + patch_size_level0, including tiles summed into shared cells."""
    got = encoder.encode_slide_from_patch_features(
        golden_tiles(golden, tag), golden[f"{tag}_official_coords"], int(golden[f"{tag}_patch_size_lv0"])
    )
    assert np.abs(got - golden[f"{tag}_embedding"]).max() <= TOL


@pytest.mark.slow  # four full TITAN forwards
def test_background_and_positions_matter(golden, encoder):
    tag = "mpp05_long"
    tiles, x, y = golden_tiles(golden, tag), golden[f"{tag}_x"], golden[f"{tag}_y"]
    zero = int(golden[f"{tag}_zero_rows"][0])
    keep = np.arange(len(tiles)) != zero
    np.testing.assert_allclose(encoder(tiles[keep], x[keep], y[keep], 0.5), golden[f"{tag}_embedding"], atol=TOL)
    shifted = encoder(tiles, x + 512 * 9, y + 512 * 4, 0.5)  # a translation of the whole slide changes nothing
    assert np.abs(shifted - golden[f"{tag}_embedding"]).max() <= TOL
    spread = encoder(tiles, x * 2, y, 0.5)  # gaps between every tile: other ALiBi distances
    assert np.abs(spread - golden[f"{tag}_embedding"]).max() > 1e-3


# --- coordinate rule ----------------------------------------------------------------------
@pytest.mark.slow  # a 5200 x 4300 px slide written and tiled per case
@pytest.mark.parametrize("mpp", [0.25, 0.2631, 0.5])
def test_cells_of_a_slide_tiled_by_pathray_are_its_grid_columns_and_rows(tmp_path, mpp):
    path = write_synthetic_svs(
        tmp_path / "s.svs", (5200, 4300), mpp=mpp, tissue_rects=((0, 0, 5200, 4300),), downsamples=(1, 4)
    )
    with open_slide(str(path)) as slide:
        grid = plan_tiles(slide, "s", TilingConfig(tile_px=512, target_mpp=0.5, min_tissue_fraction=0.0))
    keep = (grid.x >= grid.x[5]) & (grid.y > 0)  # an offset: not starting at the first column / row
    cols = np.searchsorted(np.unique(grid.x[keep]), grid.x[keep])  # every column and row is present
    rows = np.searchsorted(np.unique(grid.y[keep]), grid.y[keep])
    cells = titan_cells(grid.x[keep], grid.y[keep], mpp)
    np.testing.assert_array_equal(cells, np.stack([cols, rows], 1))
    assert cells[:, 0].max() >= 4 and cells[:, 1].max() >= 2


def test_plain_floor_would_misplace_tiles_and_off_lattice_coordinates_are_refused(golden):
    x, y, mpp = golden["mpp02631_x"], golden["mpp02631_y"], 0.2631
    step = 256 / mpp
    naive = np.floor((x - x.min()) / step).astype(np.int64)
    exact = titan_cells(x, y, mpp)[:, 0]
    assert (naive != exact).any() and (exact == np.round(x / step) - np.round(x.min() / step)).all()
    with pytest.raises(ValueError, match="not on TITAN's lattice"):
        titan_cells(x + 200, y, mpp)  # e.g. tiles cut with another stride or origin
    with pytest.raises(ValueError, match="slide_mpp"):
        titan_cells(x, y, float("nan"))
    assert official_cells(np.array([[1024, 2048], [3072, 2048], [3100, 5000]]), 1024).tolist() == [
        [0, 0],
        [2, 0],
        [2, 2],
    ]


def test_alibi_slopes_for_twelve_heads():
    base = [2.0 ** -(i + 1) for i in range(8)]  # power-of-two part: 8 heads
    extra = [2 ** (-0.5 * (2 * i + 1)) for i in range(4)]  # every other slope of 16 heads
    np.testing.assert_allclose(alibi_slopes(12), base + extra, rtol=1e-15)


# --- weights ------------------------------------------------------------------------------
def test_parameter_count_and_release_layout(golden, weights_file):
    with torch.device("meta"):
        net = TitanSlideNet()
    assert sum(p.numel() for p in net.parameters()) == int(golden["official_n_params"]) == 48_539_904
    release = load_file(str(weights_file))
    assert {k for k in release if not k.startswith("vision_encoder.")} == set(TEXT_PART_STANDIN)
    assert tuple(release["vision_encoder.blocks.modules_list.5.attn.qkv.weight"].shape) == (2304, 768)
    assert tuple(release["vision_encoder.attn_pool_contrastive.query"].shape) == (1, 768)
    assert tuple(release["vision_encoder.attn_pool.attn.in_proj_weight"].shape) == (2304, 768)


def test_loads_the_vision_part_strictly_and_ignores_the_text_part(weights_file, encoder, tmp_path, golden):
    for k, v in random_titan_net(int(golden["weights_seed"])).state_dict().items():
        assert torch.equal(encoder.net.state_dict()[k], v), k
    release = load_file(str(weights_file))
    save_file(
        {**release, "text_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 3)},
        str(tmp_path / "model.safetensors"),
    )  # any text-tower key, any shape: never read
    again = TitanSlideEncoder.from_weights(tmp_path)  # a directory holding model.safetensors
    tiles, xy = np.random.default_rng(1).random((20, 768)).astype(np.float32), np.arange(40).reshape(2, 20) * 512
    np.testing.assert_allclose(again(tiles, *xy, 0.5), encoder(tiles, *xy, 0.5), rtol=0, atol=1e-5)  # BLAS paths
    prov = encoder.provenance()
    assert prov["architecture"] == "titan_vision_encoder" and prov["weights_fingerprint"].startswith("sha256:")
    assert "patch_size_lv0" in prov["coordinate_rule"] and "conch-v1.5" in prov["tiles"]


def test_wrong_files_are_refused(weights_file, tmp_path):
    release = load_file(str(weights_file))
    cases = {
        "missing": ({k: v for k, v in release.items() if k != "vision_encoder.norm.bias"}, r"missing keys: norm\.bias"),
        "extra": ({**release, "logit_scale": torch.ones(())}, "unexpected keys: logit_scale"),
        "shape": ({**release, "vision_encoder.proj": torch.zeros(768, 512)}, r"proj: checkpoint \(768, 512\)"),
        "gigapath": (
            {"cls_token": torch.zeros(1, 1, 768), "patch_embed.proj.weight": torch.zeros(768, 1536)},
            "unexpected keys: patch_embed.proj.weight",
        ),
    }
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(WeightsMismatchError, match=message) as exc:
            TitanSlideEncoder.from_weights(tmp_path / f"{name}.safetensors")
        assert exc.value.error_type == "weights_mismatch"
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsCorruptError):
        TitanSlideEncoder.from_weights(tmp_path / "junk.safetensors")
    with pytest.raises(WeightsUnavailableError, match="model.safetensors"):
        TitanSlideEncoder.from_weights(tmp_path / "nowhere")


def test_hub_default_without_network_or_cache_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="MahmoodLab/TITAN") as exc:
        TitanSlideEncoder.from_weights(None)
    assert "HF_TOKEN" in str(exc.value)


def test_bad_inputs(encoder):
    with pytest.raises(ValueError, match="768"):
        encoder(np.zeros((3, 1536), np.float32), [0, 512, 1024], [0, 0, 0], 0.5)
    with pytest.raises(ValueError, match="3 tile embeddings but 2"):
        encoder(np.ones((3, 768), np.float32), [0, 512], [0, 0], 0.5)


# --- memory limit -------------------------------------------------------------------------
def test_a_slide_over_the_memory_limit_is_a_per_slide_error_and_the_stage_goes_on(weights_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PATHRAY_SLIDE_ENCODER_MEMORY_BYTES", str(2**30 + 60 * 32 * 1024))  # fixed part + 60 tiles
    spec = get_aggregator("titan")
    config = AggregateConfig(str(tmp_path / "store"), "conch-v1.5", "titan", weights=str(weights_file))
    stage = SlideAggregatorStage(config, spec, "cpu", {"aggregator": {"fingerprint": "f"}, "run_id": "r"})
    assert stage.build_error is None and stage.aggregator.encoder.max_tiles() == 60
    rows = [loaded_row("big", 61), loaded_row("small", 60)]
    results = [stage._one(r) for r in rows]
    assert results[0]["status"] == "error" and results[0]["error_type"] == "slide_too_large_for_encoder"
    assert "61 tiles exceed" in results[0]["error_message"] and "limit of 60 tiles" in results[0]["error_message"]
    assert results[1]["status"] == "ok"
    with pytest.raises(SlideTooLargeForEncoderError) as exc:
        stage.aggregator.encoder(*tiles_of(61), 0.5)
    assert (exc.value.n_tiles, exc.value.limit_tiles) == (61, 60)
    assert describe(exc.value)[0] == "slide_too_large_for_encoder"


def tiles_of(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.random.default_rng(n).random((n, 768)).astype(np.float32),
        np.arange(n, dtype=np.int64) * 512,
        np.zeros(n, np.int64),
    )


def loaded_row(slide_id: str, n: int) -> dict:
    tiles, x, y = tiles_of(n)
    return {
        "slide_id": slide_id,
        "cohort": "c",
        "status": "ok",
        "stage": None,
        "error_type": None,
        "error_message": None,
        "n_tiles": n,
        "dim": 768,
        "embeddings": tiles.tobytes(),
        "x": x.tobytes(),
        "y": y.tobytes(),
        "slide_mpp": 0.5,
        "kept": b"",
        "tile_provenance": "{}",
        "features_path": "f",
        "load_s": 0.0,
    }


# --- what `pathray aggregate --aggregator titan` needs from a store ----------------------------
def make_store(root: Path, models: list[str], tiling: TilingConfig) -> FeatureStore:
    store = FeatureStore(str(root))
    store.ensure_config(tiling_record(tiling), {m: {"model": m, "fingerprint": m} for m in models})
    return store


def test_titan_spec_states_what_it_needs():
    spec = AGGREGATORS["titan"]
    assert (spec.tile_models, spec.input_dim, spec.output_dim) == (("conch-v1.5",), 768, 768)
    assert (spec.tiles.tile_px, spec.tiles.target_mpp) == (512, 0.5)
    assert spec.record("w")["tiles"] == "512-px tiles at 0.5 µm/px without overlap"
    assert "tiles" not in get_aggregator("gigapath-slide").record("w")  # older records (fingerprints) unchanged


@pytest.mark.parametrize(
    ("models", "tiling", "message", "out"),
    [
        (["uni"], TilingConfig(tile_px=224, target_mpp=0.5), "takes embeddings of conch-v1.5, not 'uni'", "NEW_STORE"),
        (
            ["conch-v1.5"],
            TilingConfig(tile_px=224, target_mpp=0.5),
            "needs 512-px tiles at 0.5 µm/px without overlap; .* holds 224-px tiles at 0.5 µm/px",
            "NEW_STORE",
        ),
        (["conch-v1.5"], TilingConfig(tile_px=512, target_mpp=0.25), "holds 512-px tiles at 0.25 µm/px", "NEW_STORE"),
        (["conch-v1.5"], TilingConfig(tile_px=512, target_mpp=0.5, stride_px=256), "with a 256-px stride", "NEW_STORE"),
        (["uni"], TilingConfig(tile_px=512, target_mpp=0.5), "not in the store", "STORE"),
    ],
)
def test_aggregate_refuses_a_store_without_what_titan_needs(tmp_path, models, tiling, message, out):
    make_store(tmp_path / "s", models, tiling)
    model = "uni" if models == ["uni"] and "takes" in message else "conch-v1.5"
    with pytest.raises(ValueError, match=message) as exc:
        run_aggregate(AggregateConfig(str(tmp_path / "s"), model, "titan"))
    target = str(tmp_path / "s") if out == "STORE" else "NEW_STORE"
    assert str(exc.value).endswith(
        f"make them with: pathray embed --manifest MANIFEST --models conch-v1.5 "
        f"--tile-px 512 --target-mpp 0.5 --out {target}"
    )
    assert not (tmp_path / "s" / "_commits").exists()  # refused before any work


def test_cli_exits_2_with_the_embed_command(tmp_path, capsys):
    from pathray.cli import main

    make_store(tmp_path / "s", ["conch-v1.5"], TilingConfig(tile_px=448, target_mpp=0.5))
    code = main(["aggregate", "--store", str(tmp_path / "s"), "--model", "conch-v1.5", "--aggregator", "titan"])
    assert code == 2
    assert (
        "pathray embed --manifest MANIFEST --models conch-v1.5 --tile-px 512 --target-mpp 0.5"
        in capsys.readouterr().err
    )


# --- end to end: `pathray aggregate --aggregator titan` over a store --------------------------
def store_slide(store: FeatureStore, slide_path: Path, slide_id: str, seed: int) -> None:
    """Tile a slide as `pathray embed --tile-px 512 --target-mpp 0.5` would and commit random
    768-d float32 features for it as model conch-v1.5."""
    from pathray.store import CommitRequest, embeddings_to_arrow, feature_schema, finalize_slide

    with open_slide(str(slide_path)) as slide:
        grid = plan_tiles(slide, slide_id, TilingConfig(tile_px=512, target_mpp=0.5, min_tissue_fraction=0.25))
    features = (np.random.default_rng(seed).random((len(grid), 768)) * 2 - 1).astype(np.float32)
    table = grid.to_table().append_column("embedding", embeddings_to_arrow(features))
    store.write_chunk("conch-v1.5", slide_id, "c0", table.cast(feature_schema(768, pa.float32())))
    finalize_slide(store, CommitRequest("conch-v1.5", slide_id, "demo", ("c0",), len(grid), {}, {}, "h", "r"))


@pytest.mark.slow  # a Ray Data run on 2 CPUs
def test_aggregate_job_runs_titan_as_the_encoder_called_directly(ray_cluster, weights_file, encoder, tmp_path):
    store = make_store(tmp_path / "store", ["conch-v1.5"], TilingConfig(tile_px=512, target_mpp=0.5))
    mpps = {"a": 0.25, "b": 0.2631}
    for i, (slide_id, mpp) in enumerate(mpps.items()):
        path = write_synthetic_svs(
            tmp_path / f"{slide_id}.svs",
            (6000, 5000),
            mpp=mpp,
            seed=i,
            tissue_rects=((500, 400, 5200, 3900),),
            downsamples=(1, 4),
        )
        store_slide(store, path, slide_id, seed=i)
    report = run_aggregate(
        AggregateConfig(str(store.root), "conch-v1.5", "titan", weights=str(weights_file)), progress_bars=False
    )
    assert report.counts == {"ok": 2, "no_tissue": 0, "error": 0}
    rows = {r["slide_id"]: r for r in store.slide_features("conch-v1.5", "titan").to_table().to_pylist()}
    for slide_id, mpp in mpps.items():
        tiles = store.dataset("conch-v1.5").to_table().filter(pc.field("slide_id") == slide_id)
        tiles = tiles.sort_by("tile_index")
        emb = np.stack(tiles.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        direct = encoder(emb, tiles.column("x").to_numpy(), tiles.column("y").to_numpy(), mpp)
        assert len(emb) >= 12 and rows[slide_id]["n_tiles"] == len(emb)
        assert np.abs(np.asarray(rows[slide_id]["embedding"], np.float32) - direct).max() <= TOL
