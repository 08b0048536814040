"""`pathray embed` / jobs/embed.py: config merging, dry run, exit codes, a real run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pathray.cli import main
from pathray.cli.embed import configure, raw_config
from pathray.job.config import build_job_config

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(argv)


def test_yaml_config_with_cli_overrides(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "manifest": "m.csv",
                "out": "store",
                "models": ["uni2-h", "kaiko-vits16"],
                "tiling": {"tile_px": 224, "target_mpp": 0.5, "min_tissue_fraction": 0.5},
                "encoders": {"uni2-h": {"dtype": "bf16", "batch_size": 128}},
                "resources": {"readers": 8},
            }
        )
    )
    args = parse(
        [
            "--config",
            str(job),
            "--target-mpp",
            "1.0",
            "--weights",
            "uni2-h=/models/uni2-h",
            "--output-dtype",
            "float16",
            "--encoder-actors",
            "2",
            "--keep-columns",
            "case_id,label",
        ]
    )
    config = build_job_config(raw_config(args))
    assert config.models == ("uni2-h", "kaiko-vits16")
    assert (config.tiling.tile_px, config.tiling.target_mpp, config.tiling.min_tissue_fraction) == (224, 1.0, 0.5)
    uni = config.encoders["uni2-h"]
    assert (uni.weights, uni.dtype, uni.batch_size, uni.output_dtype) == ("/models/uni2-h", "bf16", 128, "float16")
    assert config.encoders["kaiko-vits16"].output_dtype == "float16"
    assert (config.resources.readers, config.resources.encoder_actors) == (8, 2)
    assert config.keep_columns == ("case_id", "label")


def test_tiling_defaults_to_the_first_models_native_tile(caplog):
    # Prov-GigaPath's card: Resize(256) -> CenterCrop(224): its tiles are 256 px at 0.5 µm/px
    with caplog.at_level(logging.WARNING, logger="pathray.job.config"):
        config = build_job_config({"manifest": "m.csv", "out": "o", "models": "prov-gigapath"})
    assert (config.tiling.tile_px, config.tiling.target_mpp) == (256, 0.5)
    assert not caplog.records  # one model: nothing to warn about
    config = build_job_config({"manifest": "m.csv", "out": "o", "models": "uni2-h,virchow2"})
    assert (config.tiling.tile_px, config.tiling.target_mpp) == (224, 0.5)
    with pytest.raises(ValueError, match="unknown job config keys"):
        build_job_config({"manifest": "m.csv", "out": "o", "models": "uni", "tile_size": 3})


def test_models_with_different_native_tiles_get_each_their_own_tiling(caplog):
    with caplog.at_level(logging.WARNING, logger="pathray.job.config"):
        config = build_job_config({"manifest": "m.csv", "out": "o", "models": "uni2-h,prov-gigapath,kaiko-vits16"})
    assert not caplog.records  # nothing to warn about: every model gets its card's tile
    assert (config.tiling.tile_px, config.tiling.target_mpp) == (224, 0.5)
    assert {m: (t.tile_px, t.target_mpp) for m, t in config.model_tilings.items()} == {"prov-gigapath": (256, 0.5)}
    assert config.tiling_of("prov-gigapath").tissue == config.tiling.tissue
    groups = config.tiling_groups()
    assert [(g.tiling.tile_px, g.models) for g in groups] == [
        (224, ("uni2-h", "kaiko-vits16")),
        (256, ("prov-gigapath",)),
    ]
    same = build_job_config({"manifest": "m.csv", "out": "o", "models": "kaiko-vits16,uni,virchow2"})
    assert same.model_tilings == {} and len(same.tiling_groups()) == 1 and same.tiling_groups()[0].models is None


def test_a_pinned_tiling_serves_every_model_and_warns_who_sees_another_field_of_view(caplog):
    with caplog.at_level(logging.WARNING, logger="pathray.job.config"):
        config = build_job_config(
            {"manifest": "m.csv", "out": "o", "models": "uni2-h,prov-gigapath,kaiko-vits16", "tiling": {"tile_px": 224}}
        )
    assert (config.tiling.tile_px, config.tiling.target_mpp) == (224, 0.5) and config.model_tilings == {}
    (record,) = caplog.records
    text = record.getMessage()
    assert "uni2-h: 224 px at 0.5 µm/px" in text and "prov-gigapath: 256 px at 0.5 µm/px" in text
    assert "224 px at 0.5 µm/px, for every model" in text and "so prov-gigapath see" in text
    assert "Leave tile_px and target_mpp unset" in text


def test_dry_run_reports_plan_without_running(tmp_path, synthetic_svs_025, synthetic_svs_05, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\na,{synthetic_svs_025}\nb,{synthetic_svs_05}\nbad,{tmp_path}/missing.svs\n")
    code = main(
        [
            "embed",
            "--manifest",
            str(manifest),
            "--models",
            "kaiko-vits16,not-a-model",
            "--out",
            str(tmp_path / "store"),
            "--dry-run",
            "--runner",
            "local",
        ]
    )
    plan = json.loads(capsys.readouterr().out)
    assert code == 0
    assert plan["slides_to_do"] == 3 and plan["unknown_models"] == ["not-a-model"] and plan["runner_here"] == "local"
    expected = len(synthetic_svs_025.expected_tiles(0.5, 224)) + len(synthetic_svs_05.expected_tiles(0.5, 224))
    assert plan["estimated_tiles"] == expected  # mean tiles of the 3 sampled slides x 3 slides to do
    assert plan["sample_errors"][0]["error_type"] == "slide_not_found"
    assert not (tmp_path / "store").exists()


def test_dry_run_reports_the_config_mismatch_the_run_would_hit(tmp_path, synthetic_svs_05, capsys):
    from pathray.job.config import model_record, tiling_record
    from pathray.store import FeatureStore

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\na,{synthetic_svs_05}\n")
    stored = build_job_config({"manifest": str(manifest), "out": str(tmp_path / "store"), "models": "kaiko-vits16"})
    FeatureStore(stored.out).ensure_config(
        tiling_record(stored.tiling), {"kaiko-vits16": model_record("kaiko-vits16", stored.encoders["kaiko-vits16"])}
    )
    args = [
        "embed",
        "--manifest",
        str(manifest),
        "--models",
        "kaiko-vits16",
        "--out",
        str(tmp_path / "store"),
        "--tile-px",
        "256",
        "--dry-run",
    ]
    assert main(args) == 2
    assert "tile_px: store has 224, this run asks for 256" in capsys.readouterr().err
    assert main(args + ["--new-version"]) == 0
    assert "/versions/" in json.loads(capsys.readouterr().out)["store"]


def test_unusable_manifest_exits_2_with_every_problem(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\n../evil,a.svs\ndup,b.svs\ndup,c.svs\nok,\n")
    code = main(["embed", "--manifest", str(manifest), "--models", "kaiko-vits16", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "row 1" in err and "dup" in err and "row 4" in err


@pytest.mark.timeout(300)
def test_embed_command_runs_the_job(ray_cluster, synthetic_svs_05, random_weights, tmp_path, capsys):
    weights = random_weights("kaiko-vits16", depth=1)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path,cohort\nb,{synthetic_svs_05},c1\n")
    argv = [
        "embed",
        "--manifest",
        str(manifest),
        "--models",
        "kaiko-vits16",
        "--out",
        str(tmp_path / "store"),
        "--weights",
        f"kaiko-vits16={weights}",
        "--no-progress",
        "--run-id",
        "cli-run",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kaiko-vits16: ok 1" in out and str(tmp_path / "store") in out
    report = json.loads((tmp_path / "store" / "_runs" / "cli-run" / "report.json").read_text())
    assert report["per_model"]["kaiko-vits16"]["tiles"] == len(synthetic_svs_05.expected_tiles(0.5, 224))
    # same store, other tiling: refused, exit 2
    assert main(argv[:-2] + ["--tile-px", "256"]) == 2
    assert "tiling" in capsys.readouterr().err


def test_job_entry_point_has_the_cli_options():
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "embed.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    for option in ("--manifest", "--models", "--out", "--config", "--dry-run", "--weights"):
        assert option in out.stdout


def test_dry_run_on_an_index_manifest_estimates_tiles_and_gpu_hours_without_the_bucket(tmp_path, capsys):
    """Rows with the IDC index's geometry are estimated from it: no slide is opened (these
    paths point at a bucket this machine cannot reach), and GPU-hours come labelled as the
    50 %-MFU target."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pathray.encoders.cost import target_tiles_per_s
    from pathray.job.estimate import grid_tiles

    rows = [
        {
            "slide_id": f"s{i}",
            "path": f"s3://idc-open-data/{i:08d}-0000-0000-0000-000000000000/",
            "width_px": w,
            "height_px": h,
            "index_mpp": mpp,
        }
        for i, (w, h, mpp) in enumerate([(100_000, 80_000, 0.25), (60_000, 40_000, 0.5)])
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    code = main(
        [
            "embed",
            "--manifest",
            str(tmp_path / "m.parquet"),
            "--models",
            "uni2-h",
            "--out",
            str(tmp_path / "store"),
            "--dry-run",
        ]
    )
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["sampled_slides"] == 0 and plan["tile_estimate"].startswith("index geometry")
    tiles = grid_tiles(100_000, 80_000, 0.25, 224, 0.5) + grid_tiles(60_000, 40_000, 0.5, 224, 0.5)
    assert plan["estimated_tiles"] == tiles
    assert plan["gpu_hours"]["per_model"]["uni2-h"] == round(tiles / target_tiles_per_s("uni2-h") / 3600, 2)
    assert "not measured" in plan["gpu_hours"]["basis"]
    assert plan["store_objects"]["features_files"] == plan["store_objects"]["commit_records"] == 2
    assert plan["store_objects"]["staged_chunks_transient"] == plan["estimated_chunks"]


def test_dry_run_reads_index_geometry_from_a_csv_manifest_and_estimates_each_tiling(tmp_path, capsys):
    """CSV cells arrive as text; a run of models with different native tiles is estimated
    per tiling (kaiko: 224 px, Prov-GigaPath: 256 px at 0.5 µm/px)."""
    from pathray.job.estimate import grid_tiles

    (tmp_path / "m.csv").write_text(
        "slide_id,path,width_px,height_px,index_mpp\n"
        "a,s3://idc-open-data/x/,100000,80000,0.25\n"
        "c,s3://idc-open-data/z/,60000,40000,0.5\n"
    )
    code = main(
        [
            "embed",
            "--manifest",
            str(tmp_path / "m.csv"),
            "--models",
            "kaiko-vits16,prov-gigapath",
            "--out",
            str(tmp_path / "store"),
            "--dry-run",
        ]
    )
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    by_px = {g["tile_px"]: g for g in plan["tilings"]}
    assert sorted(by_px) == [224, 256] and by_px[256]["models"] == ["prov-gigapath"]
    assert by_px[224]["estimated_tiles"] == grid_tiles(100_000, 80_000, 0.25, 224, 0.5) + grid_tiles(
        60_000, 40_000, 0.5, 224, 0.5
    )
    assert by_px[256]["estimated_tiles"] == grid_tiles(100_000, 80_000, 0.25, 256, 0.5) + grid_tiles(
        60_000, 40_000, 0.5, 256, 0.5
    )
    assert plan["estimated_tiles"] == by_px[224]["estimated_tiles"] + by_px[256]["estimated_tiles"]
