"""The in-process runner (pathray.job.localrun): when it is chosen, and the `pathray embed`
command's output and exit through it.

The store it writes (against the tiler + encoder, every bad input, resume after a kill -9)
is checked by test_pipeline.py's and test_pipeline_s3.py's tests, which run once per runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from fixtures.slides import write_manifest

from pathray.store import FeatureStore

pytestmark = pytest.mark.timeout(300)

CHOICE = textwrap.dedent("""
    import sys
    from pathray.job.config import build_job_config
    from pathray.job.localrun import choose_runner
    raw = dict(manifest="m.csv", out="o", models=["kaiko-vits16"])
    if sys.argv[1] == "initialised":
        import ray
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    if sys.argv[1] == "address":
        raw["ray_address"] = "127.0.0.1:1"
    print(choose_runner(build_job_config(raw)))
""")


@pytest.mark.parametrize(
    "case, env, want",
    [
        ("nothing", {}, "local"),  # no cluster to join, no GPU on this machine
        ("nothing", {"RAY_ADDRESS": "127.0.0.1:1"}, "ray"),  # inside `ray job submit`
        ("address", {}, "ray"),
        pytest.param("initialised", {}, "ray", marks=pytest.mark.slow),  # ray.init in the subprocess
    ],
)
def test_auto_runner_is_local_only_without_a_cluster_to_join(case, env, want, tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", CHOICE, case],
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == want


def test_embed_command_prints_everything_before_its_fast_exit(synthetic_svs_05, kaiko_vits16_weights, tmp_path):
    """`pathray embed` on the in-process runner ends with os._exit: its summary, query and
    report must all be out by then, and the exit status must be the run's."""
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {"slide_id": "a", "path": os.fspath(synthetic_svs_05)},
            {"slide_id": "gone", "path": str(tmp_path / "absent.svs")},
        ],
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pathray.cli",
            "embed",
            "--manifest",
            str(manifest),
            "--models",
            "kaiko-vits16",
            "--weights",
            f"kaiko-vits16={kaiko_vits16_weights}",
            "--out",
            str(tmp_path / "store"),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 1, out.stderr  # one slide is missing: recorded, exit 1
    assert "errors recorded: 1" in out.stdout and 'aggregate([("tile_index", "count")]))' in out.stdout
    reports = list((tmp_path / "store" / "_runs").glob("*/report.json"))
    assert out.stdout.rstrip().endswith(f"Run report: {reports[0].parent / 'report.html'}")
    assert "runner: local" in (reports[0].parent / "run.log").read_text()  # log lines: the run's log, not stderr
    saved = json.loads(reports[0].read_text())
    assert saved["runner"] == "local" and saved["exit_code"] == 1 and saved["per_model"]["kaiko-vits16"]["ok"] == 1
    assert FeatureStore(str(tmp_path / "store")).committed("kaiko-vits16") == {"a"}
    assert not (tmp_path / "store" / "_lease.json").exists()  # lease given back (its flock side file may stay)
