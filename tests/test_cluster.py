"""The job on real multi-node Ray clusters on this machine: `ray job submit`, node loss, autoscaling.

The clusters are real Ray processes (tests/fixtures/multinode.py: one process group per
node, free ports, their own temp dir), torn down whatever happens: one static cluster
shared by the job-API and node-loss tests, one autoscaling cluster for the autoscaler test. Slides, manifest, job
config and store live on the SeaweedFS S3 server; credentials reach the nodes the way
docs/cluster.md says for S3-compatible stores: AWS_* variables in every node's environment,
never in the job config, the command line or the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import yaml
from fixtures.multinode import LocalRayCluster

from pathray.demo.synthetic import write_synthetic_svs
from pathray.job.config import build_job_config
from pathray.job.raydata import run_job
from pathray.store import FeatureStore

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.cluster, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT_S = 420
TILES_PER_SLIDE = 15  # 5 x 3 tissue tiles of 224 px at 0.5 µm/px (see make_slides)


def make_slides(tmp: Path, fs, bucket: str, n: int) -> str:
    """``n`` small synthetic slides and their manifest on S3; returns the manifest's URI."""
    lines = ["slide_id,path,cohort"]
    for i in range(n):
        path = write_synthetic_svs(tmp / f"s{i}.svs", (1792, 1344), mpp=0.5, tissue_rects=[(0, 0, 1120, 672)], seed=i)
        fs.put(os.fspath(path), f"{bucket}/slides/s{i}.svs")
        lines.append(f"s{i},s3://{bucket}/slides/s{i}.svs,c{i % 2}")
    fs.pipe(f"{bucket}/manifest.csv", ("\n".join(lines) + "\n").encode())
    return f"s3://{bucket}/manifest.csv"


def job_config(manifest: str, out: str, weights: Path, scratch: Path) -> dict:
    """The job file a user would write for a cluster whose pools cannot be derived at start:
    pools pinned, encoders asking for a GPU each (docs/cluster.md)."""
    return {
        "manifest": manifest,
        "out": out,
        "models": ["kaiko-vits16"],
        "encoders": {"kaiko-vits16": {"weights": str(weights)}},
        "tiling": {"tile_px": 224, "target_mpp": 0.5},
        "chunk_tiles": 4,
        "scratch_dir": str(scratch),
        "resources": {
            "readers": 2,
            "reader_num_cpus": 1,
            "encoder_actors": 1,
            "encoder_num_gpus": 1,
            "encoder_num_cpus": 1,
            "committers": 2,
        },
    }


def working_dir(submission_id: str) -> Path:
    """The job's working dir: the repository's ``pathray/`` and ``jobs/`` plus a file naming the
    submission. Ray names a working-dir package by its content, so jobs submitted from one
    folder share one package, and the end of one job can delete it on a node while the next
    starts there (seen once: the re-run's cwd vanished). A file per submission gives each job
    its own package."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"pathray-job-{submission_id}-"))
    for name in ("pathray", "jobs"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "SUBMISSION").write_text(f"{submission_id} {uuid.uuid4().hex}\n")
    return folder


def submit(cluster, config_uri: str, submission_id: str, wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir DIR` (:func:`working_dir`); ``wait``: follow the job's
    logs until it ends (else return once it is submitted)."""
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(working_dir(submission_id)),
        *([] if wait else ["--no-wait"]),
        "--",
        "python",
        "jobs/embed.py",
        "--config",
        config_uri,
        "--no-progress",
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=cluster.client_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False
    )


def wait_for_job(cluster, submission_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(cluster, submission_id)
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info
        time.sleep(1.0)
    raise TimeoutError(f"job {submission_id} still {info['status']} after {timeout:.0f} s")


def job_info(cluster, submission_id: str) -> dict:
    request = urllib.request.Request(
        f"{cluster.dashboard_url}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {cluster.token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def features_by_slide(store: FeatureStore, model: str) -> dict[str, dict[str, np.ndarray]]:
    table = store.dataset(model).to_table()
    out = {}
    for slide_id in sorted(set(table.column("slide_id").to_pylist())):
        rows = table.filter(pc.equal(table.column("slide_id"), slide_id)).sort_by("tile_index")
        out[slide_id] = {c: rows.column(c).to_numpy() for c in ("tile_index", "x", "y")}
        out[slide_id]["embedding"] = np.stack(rows.column("embedding").to_numpy(zero_copy_only=False))
    return out


def assert_same_features(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for slide_id in want:
        for column in ("tile_index", "x", "y"):
            np.testing.assert_array_equal(got[slide_id][column], want[slide_id][column])
        np.testing.assert_allclose(got[slide_id]["embedding"], want[slide_id]["embedding"], rtol=1e-5, atol=1e-6)


N_SLIDES = 8
#: the GCS declares a silent node dead after 3 missed 1 s health checks (Ray's default: 5 missed
#: 3 s checks, each waiting up to 10 s), so in the node-loss test Ray restarts the lost actors well
#: before the run ends; a cloud cluster sees the same restarts, later
NODE_DEATH_IN_SECONDS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "3",
}


@pytest.fixture(scope="module")
def slides_on_s3(s3_server, tmp_path_factory) -> dict[str, str]:
    """A bucket holding 8 small slides and two manifests: ``all`` (8 slides) and ``three``."""
    fs, bucket = s3_server.fs, f"pathray-cluster-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    manifest = make_slides(tmp_path_factory.mktemp("cluster_slides"), fs, bucket, N_SLIDES)
    lines = fs.cat_file(manifest).decode().splitlines()
    fs.pipe(f"{bucket}/three.csv", ("\n".join(lines[:4]) + "\n").encode())
    return {"bucket": bucket, "all": manifest, "three": f"s3://{bucket}/three.csv"}


@pytest.fixture(scope="module")
def reference(ray_cluster, s3_server, slides_on_s3, kaiko_vits16_weights, tmp_path_factory) -> dict:
    """Features of the 8 slides from a local run (the test session's 2-CPU Ray, no GPU) of the
    same manifest and job config as the cluster runs."""
    raw = job_config(
        slides_on_s3["all"],
        f"s3://{slides_on_s3['bucket']}/local-store",
        kaiko_vits16_weights,
        tmp_path_factory.mktemp("reference_scratch"),
    )
    resources = {k: v for k, v in raw["resources"].items() if k != "encoder_num_gpus"}
    config = build_job_config({**raw, "resources": resources, "storage_options": s3_server.storage_options})
    assert run_job(config, progress_bars=False).exit_code == 0
    return features_by_slide(FeatureStore(raw["out"], s3_server.storage_options), "kaiko-vits16")


@pytest.fixture(scope="module")
def static_cluster(s3_server):
    """Head (0 CPUs) + two 2-CPU nodes + one node declaring a GPU (1 CPU), shared by the tests
    of this module; the S3 credentials are in every node's environment."""
    cluster = LocalRayCluster(env={**os.environ, **s3_server.env, **NODE_DEATH_IN_SECONDS})
    try:
        cluster.start_head()
        for name, cpus, gpus in (("cpu-a", 2, 0), ("cpu-b", 2, 0), ("gpu", 1, 1)):
            cluster.add_node(name, num_cpus=cpus, num_gpus=gpus)
        yield cluster
    finally:
        cluster.shutdown()


def put_config(fs, bucket: str, raw: dict, name: str) -> str:
    fs.pipe(f"{bucket}/{name}", yaml.safe_dump(raw).encode())
    return f"s3://{bucket}/{name}"


def test_job_submit_on_multinode_cluster(
    static_cluster, s3_server, slides_on_s3, kaiko_vits16_weights, reference, tmp_path
):
    cluster, fs, bucket = static_cluster, s3_server.fs, slides_on_s3["bucket"]
    raw = job_config(slides_on_s3["three"], f"s3://{bucket}/store-submit", kaiko_vits16_weights, tmp_path / "scratch")
    done = submit(cluster, put_config(fs, bucket, raw, "submit.yaml"), "submit-1")
    info = job_info(cluster, "submit-1")
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    # the job's logs (streamed by `ray job submit`) end with the run report
    assert "pathray run " in done.stdout and "kaiko-vits16: ok 3, no_tissue 0, error 0" in done.stdout
    # where the work ran: encoders on the GPU node, readers on the CPU nodes, nothing on the head
    nodes = cluster.alive_nodes()
    actors = [a for a in cluster.state("actors") if a.get("job_id") == info["job_id"]]
    where = {a["class_name"] + "/" + a["actor_id"][:6]: a["node_id"] for a in actors}
    placed = [a for a in actors if a["node_id"]]  # a pool may ask for one more actor than it ever places
    encoders = [a["node_id"] for a in placed if "ChunkEncoder" in a["class_name"]]
    readers = [a["node_id"] for a in placed if "ChunkReader" in a["class_name"]]
    assert encoders and set(encoders) == {nodes["gpu"]}, (where, nodes)
    assert readers and set(readers) <= {nodes["cpu-a"], nodes["cpu-b"]}, (where, nodes)
    assert len([a for a in actors if a["class_name"] == "Committer"]) == 2

    # the store on S3 equals a local run of the same manifest and job config
    store = FeatureStore(raw["out"], s3_server.storage_options)
    assert store.committed("kaiko-vits16") == {"s0", "s1", "s2"}
    got = features_by_slide(store, "kaiko-vits16")
    assert {k: len(v["tile_index"]) for k, v in got.items()} == dict.fromkeys(got, TILES_PER_SLIDE)
    assert_same_features(got, {k: reference[k] for k in ("s0", "s1", "s2")})

    # credentials: not in the store, not in what the job server keeps about the job
    assert s3_server.secret_key not in json.dumps(info)
    for path in fs.find(raw["out"]):
        if path.endswith(".json"):
            assert s3_server.secret_key not in fs.cat_file(path).decode()


def busiest_cpu_node(cluster, job_id: str) -> tuple[str, dict[str, str]]:
    """The name of the CPU node holding the most of the job's live actors (pool actors,
    committers), and those actors (``{actor_id: class_name}``), from one look at the cluster."""
    names = {node_id: name for name, node_id in cluster.alive_nodes().items()}
    alive = [a for a in cluster.state("actors", job_id=job_id, state="ALIVE") if a["node_id"] in names]
    where = [names[a["node_id"]] for a in alive if names[a["node_id"]].startswith("cpu-")]
    assert where, f"no live actor of job {job_id} on a CPU node"
    victim = max(set(where), key=where.count)
    return victim, {a["actor_id"]: a["class_name"] for a in alive if names[a["node_id"]] == victim}


def test_node_lost_mid_run_its_actors_restart_and_the_run_finishes(
    static_cluster, s3_server, slides_on_s3, kaiko_vits16_weights, reference, tmp_path
):
    cluster, fs, bucket = static_cluster, s3_server.fs, slides_on_s3["bucket"]
    raw = job_config(slides_on_s3["all"], f"s3://{bucket}/store-loss", kaiko_vits16_weights, tmp_path / "scratch")
    commits = f"{bucket}/store-loss/_commits/model=kaiko-vits16"
    submitted = submit(cluster, put_config(fs, bucket, raw, "loss.yaml"), "loss-1", wait=False)
    assert submitted.returncode == 0, submitted.stderr
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and not (fs.exists(commits) and fs.ls(commits, refresh=True)):
        assert job_info(cluster, "loss-1")["status"] in ("PENDING", "RUNNING")
        time.sleep(0.5)
    job_id = job_info(cluster, "loss-1")["job_id"]
    victim, lost = busiest_cpu_node(cluster, job_id)
    cluster.kill_node(victim)  # a CPU node lost like a reclaimed spot instance: raylet, store, workers
    before = len(fs.ls(commits, refresh=True))
    cluster.add_node(victim, num_cpus=2)  # its replacement, as a spot node group launches one
    first = wait_for_job(cluster, "loss-1")
    assert before < N_SLIDES, "the node was killed after the job had committed everything"
    assert first["status"] == "SUCCEEDED", first.get("message", "")[-6000:]

    # the pool actors (and any committer) that lived on the lost node were restarted by Ray from the
    # constructor arguments Ray Data keeps in the object store (docs/cluster.md), not given up
    actors = {a["actor_id"]: a for a in cluster.state("actors", job_id=job_id)}
    assert lost and all(int(actors[k]["num_restarts"]) >= 1 for k in lost), (lost, [actors[k] for k in lost])
    store = FeatureStore(raw["out"], s3_server.storage_options)
    assert store.committed("kaiko-vits16") == {f"s{i}" for i in range(N_SLIDES)}
    files = fs.find(f"{bucket}/store-loss/features")
    assert sorted(os.path.basename(f) for f in files) == sorted(f"s{i}.parquet" for i in range(N_SLIDES))
    assert not [f for f in fs.find(f"{bucket}/store-loss/_staging") if f.endswith(".parquet")]
    got = features_by_slide(store, "kaiko-vits16")
    assert {k: len(set(v["tile_index"])) for k, v in got.items()} == dict.fromkeys(got, TILES_PER_SLIDE)
    assert_same_features(got, reference)

    print(f"{victim} lost after {before} of {N_SLIDES} commits; restarted: {sorted(set(lost.values()))}")


AUTOSCALING = {
    "idle_timeout_minutes": 0.1,
    "available_node_types": {
        "cpu": {"resources": {"CPU": 2, "testnode_cpu": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        "gpu": {
            "resources": {"CPU": 1, "GPU": 1, "testnode_gpu": 1},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 1,
        },
    },
}


def test_autoscaler_adds_cpu_and_gpu_nodes_from_zero_then_removes_them(
    multinode_cluster, s3_server, s3_bucket, kaiko_vits16_weights, tmp_path
):
    fs = s3_server.fs
    manifest = make_slides(tmp_path, fs, s3_bucket, 2)
    raw = job_config(manifest, f"s3://{s3_bucket}/store", kaiko_vits16_weights, tmp_path / "scratch")
    raw["resources"].update(readers=1, encoder_actors_min=1)  # as docs/cluster.md says for clusters that start empty
    fs.pipe(f"{s3_bucket}/job.yaml", yaml.safe_dump(raw).encode())
    cluster = multinode_cluster({**os.environ, **s3_server.env}, AUTOSCALING)
    assert set(cluster.alive_nodes()) == {"head"}  # no worker node until the job asks

    done = submit(cluster, f"s3://{s3_bucket}/job.yaml", "embed-1")
    assert job_info(cluster, "embed-1")["status"] == "SUCCEEDED", done.stdout[-4000:]
    assert "kaiko-vits16: ok 2, no_tissue 0, error 0" in done.stdout
    nodes = cluster.state("nodes")
    kinds = {
        n["node_id"]: (
            "gpu"
            if "testnode_gpu" in n["resources_total"]
            else "cpu"
            if "testnode_cpu" in n["resources_total"]
            else "head"
        )
        for n in nodes
    }
    assert sorted(kinds.values()) == ["cpu", "gpu", "head"]  # the autoscaler added one node of each type
    actors = [a for a in cluster.state("actors") if "MapWorker" in (a.get("class_name") or "") and a["node_id"]]
    assert {kinds[a["node_id"]] for a in actors if "ChunkEncoder" in a["class_name"]} == {"gpu"}
    assert {kinds[a["node_id"]] for a in actors if "ChunkReader" in a["class_name"]} == {"cpu"}
    assert FeatureStore(raw["out"], s3_server.storage_options).committed("kaiko-vits16") == {"s0", "s1"}

    deadline = time.monotonic() + 180  # idle nodes go after idle_timeout_minutes (6 s) plus the autoscaler's rounds
    while time.monotonic() < deadline and set(cluster.alive_nodes()) != {"head"}:
        time.sleep(2.0)
    assert set(cluster.alive_nodes()) == {"head"}
