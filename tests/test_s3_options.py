"""Slides and store on different S3 endpoints: the slide options never inherit the store's
endpoint (nor AWS_ENDPOINT_URL), and every command that reads slides takes the same options.
Real SeaweedFS, reached directly for slides and through the byte-counting proxy for the rest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pathray.fs import split_uri

STORE_ENDPOINT = "http://127.0.0.1:9"


def _embed_config(argv: list[str]):
    import argparse

    from pathray.cli import embed as cli_embed
    from pathray.job.config import build_job_config

    parser = argparse.ArgumentParser()
    cli_embed.configure(parser)
    return build_job_config(cli_embed.raw_config(parser.parse_args(argv)))


def test_anonymous_slides_are_read_from_aws_not_from_the_store_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", STORE_ENDPOINT)  # meant for the store
    config = _embed_config(
        [
            "--manifest",
            "m.csv",
            "--out",
            "s3://b/store",
            "--models",
            "uni",
            "--s3-endpoint-url",
            STORE_ENDPOINT,
            "--s3-anonymous",
        ]
    )
    assert config.storage_options["client_kwargs"]["endpoint_url"] == STORE_ENDPOINT
    fs, _ = split_uri("s3://idc-open-data/x/", config.slide_options)
    fs.connect()
    assert fs.s3.meta.endpoint_url == "https://s3.amazonaws.com" and fs.anon
    store_fs, _ = split_uri("s3://b/store", config.storage_options)
    store_fs.connect()
    assert store_fs.s3.meta.endpoint_url == STORE_ENDPOINT


def test_a_slide_endpoint_of_their_own(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", STORE_ENDPOINT)
    config = _embed_config(
        [
            "--manifest",
            "m.csv",
            "--out",
            "s3://b/store",
            "--models",
            "uni",
            "--slide-s3-endpoint-url",
            "http://127.0.0.1:10",
        ]
    )
    fs, _ = split_uri("s3://slides/x.svs", config.slide_options)
    fs.connect()
    assert fs.s3.meta.endpoint_url == "http://127.0.0.1:10"
    same = _embed_config(["--manifest", "m.csv", "--out", "s3://b/store", "--models", "uni"])
    assert same.slide_options is same.storage_options  # no slide option: one storage for all


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pathray.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.s3
@pytest.mark.slow
def test_tile_and_heatmap_read_slides_from_their_endpoint_and_write_to_the_stores(
    s3_server, s3_bucket, s3_proxy, synthetic_svs_05, tmp_path
):
    """Store, manifest and outputs through the proxy (also AWS_ENDPOINT_URL), slides direct:
    the proxy serves the manifest and takes the outputs but never a byte of a slide."""
    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job
    from pathray.testing import sleep_encoder

    slide = f"s3://{s3_bucket}/slides/a.svs"
    s3_server.fs.put_file(os.fspath(synthetic_svs_05), slide)
    s3_server.fs.pipe(f"{s3_bucket}/m.csv", f"slide_id,path\na,{slide}\n".encode())
    env = dict(os.environ, PYTHONPATH=os.getcwd(), **{**s3_server.env, "AWS_ENDPOINT_URL": s3_proxy.endpoint_url})
    s3_opts = ["--s3-endpoint-url", s3_proxy.endpoint_url, "--slide-s3-endpoint-url", s3_server.endpoint_url]
    done = _cli(["tile", f"s3://{s3_bucket}/m.csv", "--out", f"s3://{s3_bucket}/tiled", *s3_opts], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert s3_server.fs.exists(f"{s3_bucket}/tiled/qc/a.png") and s3_server.fs.exists(
        f"{s3_bucket}/tiled/tiles.parquet"
    )
    assert s3_proxy.bytes_for("m.csv") > 0 and s3_proxy.bytes_for("slides/a.svs") == 0

    config = build_job_config(
        {
            "manifest": f"s3://{s3_bucket}/m.csv",
            "out": f"s3://{s3_bucket}/store",
            "models": ["sleep"],
            "tiling": {"tile_px": 224, "target_mpp": 0.5},
            "runner": "local",
            "storage_options": s3_server.storage_options,
        }
    )
    assert run_job(config, {"sleep": sleep_encoder(1e4, 6)}, progress_bars=False).per_model["sleep"]["ok"] == 1
    s3_proxy.reset()
    done = _cli(
        [
            "mil",
            "heatmap",
            "--store",
            f"s3://{s3_bucket}/store",
            "--model",
            "sleep",
            "--slide",
            "a",
            "--column",
            "tissue_fraction",
            "--out",
            f"s3://{s3_bucket}/maps/a",
            *s3_opts,
        ],
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert s3_server.fs.exists(f"{s3_bucket}/maps/a.png") and s3_server.fs.exists(f"{s3_bucket}/maps/a.geojson")
    assert s3_proxy.requests > 0 and s3_proxy.bytes_for("slides/a.svs") == 0
