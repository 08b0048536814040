"""Storage outages on a real S3 server (SeaweedFS) and a real throttling proxy in front of it:
throttled or unreachable storage is ``storage_unavailable`` (retried), never a corrupt slide;
an unreachable source or store stops the run within seconds, naming the endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pathray.errors import PathrayError, StorageUnreachableError, describe
from pathray.job.stages import SlidePlanner
from pathray.tiling.grid import TilingConfig
from pathray.wsi.slide import open_slide

pytestmark = [pytest.mark.s3, pytest.mark.slow]
CLOSED = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused


def _upload(s3_server, bucket: str, local, name: str) -> str:
    uri = f"s3://{bucket}/slides/{name}"
    s3_server.fs.put_file(os.fspath(local), uri)
    return uri


def _one_try(options: dict) -> dict:
    """s3fs options whose client does not retry, so each 503 reaches pathray."""
    return {**options, "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


def test_a_throttled_slide_is_storage_unavailable_not_unreadable(s3_server, s3_bucket, s3_proxy, synthetic_svs_05):
    uri = _upload(s3_server, s3_bucket, synthetic_svs_05, "throttled.svs")
    s3_proxy.throttle_every = 1  # every request answered 503 SlowDown (s3fs raises OSError(EBUSY))
    with pytest.raises(PathrayError) as info:
        open_slide(uri, storage_options=_one_try(s3_proxy.storage_options(s3_server.storage_options)))
    assert describe(info.value)[0] == "storage_unavailable"
    assert s3_proxy.throttled > 0


def test_an_unreachable_endpoint_is_storage_unavailable(s3_server, s3_bucket, synthetic_svs_05):
    uri = _upload(s3_server, s3_bucket, synthetic_svs_05, "a.svs")
    options = _one_try({**s3_server.storage_options, "client_kwargs": {"endpoint_url": CLOSED}})
    with pytest.raises(PathrayError) as info:
        open_slide(uri, storage_options=options)
    assert describe(info.value)[0] == "storage_unavailable"


def test_the_planner_retries_a_slide_through_a_brief_outage(
    s3_server, s3_bucket, s3_proxy, synthetic_svs_05, monkeypatch, tmp_path
):
    import pathray.job.outage

    monkeypatch.setattr(pathray.job.outage, "RETRY_BASE_S", 0.05)
    uri = _upload(s3_server, s3_bucket, synthetic_svs_05, "brief.svs")
    options = _one_try(s3_proxy.storage_options(s3_server.storage_options))
    planner = SlidePlanner(TilingConfig(), 64, options, str(tmp_path / "scratch"))
    s3_proxy.fail_next = 2  # the first two requests fail: two attempts of the slide, the third gets through
    rows = planner.plan_one({"slide_id": "s", "path": uri, "cohort": "", "mpp_override": None, "models": ["m"]})
    assert s3_proxy.throttled == 2
    assert rows[0]["status"] == "ok" and rows[0]["n_tiles_slide"] > 0


def _embed(args: list[str], env: dict, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pathray.cli", "embed", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    return done, time.monotonic() - started


@pytest.mark.parametrize("dry_run", [False, True])
def test_slides_behind_a_closed_port_stop_the_run_within_seconds(
    s3_server, s3_bucket, synthetic_svs_05, random_weights, tmp_path, dry_run
):
    uris = [_upload(s3_server, s3_bucket, synthetic_svs_05, f"s{i}.svs") for i in range(6)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"s{i},{u}\n" for i, u in enumerate(uris)))
    weights = random_weights("kaiko-vits16", depth=2)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), **s3_server.env)
    args = [
        "--manifest",
        str(manifest),
        "--models",
        "kaiko-vits16",
        "--weights",
        f"kaiko-vits16={weights}",
        "--out",
        str(tmp_path / "store"),
        "--runner",
        "local",
        "--no-progress",
        "--s3-endpoint-url",
        CLOSED,
    ]
    done, took_s = _embed(args + (["--dry-run"] if dry_run else []), env, timeout_s=90)
    assert done.returncode == 2, done.stderr[-3000:]
    assert took_s < 30
    assert f"cannot reach the slide source at {CLOSED}" in done.stderr
    assert "Could not connect to the endpoint" in done.stderr
    if dry_run:  # says what it is doing meanwhile
        assert "reading the manifest" in done.stderr and "checking that their storage can be reached" in done.stderr
    assert not (tmp_path / "store" / "errors").exists()


def test_a_store_answering_only_503_stops_the_run_within_seconds(
    s3_server, s3_bucket, s3_proxy, synthetic_svs_05, random_weights, tmp_path
):
    uri = _upload(s3_server, s3_bucket, synthetic_svs_05, "a.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\na,{uri}\n")
    weights = random_weights("kaiko-vits16", depth=2)
    s3_proxy.throttle_every = 1
    env = dict(os.environ, PYTHONPATH=os.getcwd(), **s3_server.env)
    args = [
        "--manifest",
        str(manifest),
        "--models",
        "kaiko-vits16",
        "--weights",
        f"kaiko-vits16={weights}",
        "--out",
        f"s3://{s3_bucket}/store",
        "--runner",
        "local",
        "--no-progress",
        "--s3-endpoint-url",
        s3_proxy.endpoint_url,
    ]
    done, took_s = _embed(args, env, timeout_s=90)
    assert done.returncode == 2, done.stderr[-3000:]
    assert took_s < 30
    message = done.stderr.splitlines()[-1]
    assert f"cannot reach the feature store at {s3_proxy.endpoint_url}" in message and "SlowDown" in message, message
    assert not s3_server.fs.exists(f"{s3_bucket}/store")


def test_slides_failing_one_after_another_for_want_of_storage_stop_the_run(
    s3_server, s3_bucket, s3_proxy, synthetic_svs_05, monkeypatch, tmp_path
):
    """The endpoint answers (the start-up check passes) but every slide object is throttled:
    the run stops after a few slides instead of recording every slide as an error."""
    import pathray.job.outage
    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job
    from pathray.store import FeatureStore
    from pathray.testing import sleep_encoder

    monkeypatch.setattr(pathray.job.outage, "RETRY_BASE_S", 0.05)
    uris = [_upload(s3_server, s3_bucket, synthetic_svs_05, f"s{i}.svs") for i in range(8)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"s{i},{u}\n" for i, u in enumerate(uris)))
    s3_proxy.fail_paths = f"/{s3_bucket}/slides/"  # object reads fail; bucket listings still answer
    config = build_job_config(
        {
            "manifest": str(manifest),
            "out": str(tmp_path / "store"),
            "models": ["sleep"],
            "tiling": {"tile_px": 224, "target_mpp": 0.5},
            "runner": "local",
            "slide_storage_options": _one_try(s3_proxy.storage_options(s3_server.storage_options)),
        }
    )
    with pytest.raises(StorageUnreachableError, match="stopping the run: the last 5 slides"):
        run_job(config, {"sleep": sleep_encoder(tiles_per_s=1e4, embed_dim=6)}, progress_bars=False)
    errors = FeatureStore(str(tmp_path / "store")).errors().to_pylist()
    assert {e["error_type"] for e in errors} == {"storage_unavailable"} and len(errors) < len(uris)


def test_a_closed_port_is_named_by_the_reachability_check(s3_server, s3_bucket):
    from pathray.job.outage import check_reachable

    started = time.monotonic()
    with pytest.raises(StorageUnreachableError, match=CLOSED):
        check_reachable(
            f"s3://{s3_bucket}/x",
            {**s3_server.storage_options, "client_kwargs": {"endpoint_url": CLOSED}},
            "slide source",
        )
    check_reachable(f"s3://{s3_bucket}/x", s3_server.storage_options, "slide source")  # a live endpoint passes
    assert time.monotonic() - started < 30
