"""The in-process runner (pathray.localrun): when it is chosen, that a killed run resumes
exactly once, and the `pathray embed` command's output and exit through it.

The store it writes is checked against the tiler + encoder and for every bad input by
test_pipeline.py's ``mixed_run`` tests, which run once per runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.compute as pc
import pytest
from fixtures.slides import write_manifest

from pathray.config import build_job_config
from pathray.fakes import sleep_encoder
from pathray.pipeline import run_job
from pathray.store import FeatureStore

pytestmark = pytest.mark.timeout(300)

CHOICE = textwrap.dedent("""
    import sys
    from pathray.config import build_job_config
    from pathray.localrun import choose_runner
    raw = dict(manifest="m.csv", out="o", models=["kaiko-vits16"])
    if sys.argv[1] == "initialised":
        import ray
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    if sys.argv[1] == "address":
        raw["ray_address"] = "127.0.0.1:1"
    print(choose_runner(build_job_config(raw)))
""")


@pytest.mark.parametrize("case, env, want", [
    ("nothing", {}, "local"),  # no cluster to join, no GPU on this machine
    ("nothing", {"RAY_ADDRESS": "127.0.0.1:1"}, "ray"),  # inside `ray job submit`
    ("address", {}, "ray"),
    ("initialised", {}, "ray"),
])
def test_auto_runner_is_local_only_without_a_cluster_to_join(case, env, want, tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", CHOICE, case], env={**base, **env}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == want


DRIVER = textwrap.dedent("""
    import sys
    from pathray.config import build_job_config
    from pathray.fakes import sleep_encoder
    from pathray.pipeline import run_job
    config = build_job_config(dict(manifest=sys.argv[1], out=sys.argv[2], models=["sleep"], runner="local",
                                   tiling={"tile_px": 224, "target_mpp": 0.5}, chunk_tiles=4))
    run_job(config, {"sleep": sleep_encoder(tiles_per_s=float(sys.argv[3]))}, progress_bars=False)
""")


@pytest.mark.slow
def test_killed_local_run_then_rerun_leaves_every_slide_exactly_once(tmp_path):
    from pathray.demo.synthetic import write_synthetic_svs

    rows = []
    for i in range(6):
        path = write_synthetic_svs(tmp_path / f"s{i}.svs", 1792, 1344, mpp=0.5, tissue_rects=[(0, 0, 1120, 672)], seed=i)
        rows.append({"slide_id": f"s{i}", "path": str(path), "cohort": "c"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "store"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(manifest), str(out), "15"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    commits = out / "_commits" / "model=sleep"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (commits.exists() and any(commits.iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.stem for p in commits.iterdir()} if commits.exists() else set()
    assert 0 < len(before) < len(rows), f"kill landed after {len(before)} commits"

    config = build_job_config(dict(manifest=str(manifest), out=str(out), models=["sleep"], runner="local",
                                   tiling={"tile_px": 224, "target_mpp": 0.5}, chunk_tiles=4))
    report = run_job(config, {"sleep": sleep_encoder(tiles_per_s=1000)}, progress_bars=False)
    assert report.runner == "local" and report.slides_skipped == len(before)
    store = FeatureStore(str(out))
    table = store.dataset("sleep").to_table()
    assert sorted(p.stem for p in (out / "features").rglob("*.parquet")) == sorted(r["slide_id"] for r in rows)
    for r in rows:
        index = table.filter(pc.equal(table.column("slide_id"), r["slide_id"])).column("tile_index").to_numpy()
        assert len(index) > 0 and sorted(index) == list(range(len(index)))  # every tile once
    assert not list((out / "_staging").rglob("*.parquet"))  # the killed run's staged chunks are gone


def test_embed_command_prints_everything_before_its_fast_exit(synthetic_svs_05, kaiko_vits16_weights, tmp_path):
    """`pathray embed` on the in-process runner ends with os._exit: its summary, query and
    report must all be out by then, and the exit status must be the run's."""
    manifest = write_manifest(tmp_path / "m.csv", [{"slide_id": "a", "path": os.fspath(synthetic_svs_05)},
                                                   {"slide_id": "gone", "path": str(tmp_path / "absent.svs")}])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "pathray.cli", "embed", "--manifest", str(manifest),
                          "--models", "kaiko-vits16", "--weights", f"kaiko-vits16={kaiko_vits16_weights}",
                          "--out", str(tmp_path / "store"), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1, out.stderr  # one slide is missing: recorded, exit 1
    assert "runner: local" in out.stderr
    assert "errors recorded: 1" in out.stdout and out.stdout.rstrip().endswith('aggregate([("tile_index", "count")]))')
    reports = list((tmp_path / "store" / "_runs").glob("*/report.json"))
    saved = json.loads(reports[0].read_text())
    assert saved["runner"] == "local" and saved["exit_code"] == 1 and saved["per_model"]["kaiko-vits16"]["ok"] == 1
    assert FeatureStore(str(tmp_path / "store")).committed("kaiko-vits16") == {"a"}
    assert not any(p.name.startswith("_lease") for p in (tmp_path / "store").iterdir())  # lease given back
