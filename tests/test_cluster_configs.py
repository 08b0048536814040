"""cluster/*.yaml parse, carry the keys `ray up` / KubeRay / jobs/embed.py need, hold no secrets."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pathray.encoders import EncoderConfig
from pathray.job.config import ResourceConfig
from pathray.job.resources import GPU_NODE_LABEL
from pathray.tiling.grid import TilingConfig

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
ENTRYPOINT = "jobs/embed.py"

# Job-config keys jobs/embed.py accepts for --config: the typed config's own fields, so this
# list cannot drift from pathray.job.config (GPUs per encoder actor are resources.encoder_num_gpus).
DOCUMENTED = {
    "manifest": None,
    "out": None,
    "models": None,
    "storage_options": None,
    "tiling": {f.name for f in dataclasses.fields(TilingConfig)},
    "encoders": {f.name for f in dataclasses.fields(EncoderConfig)} - {"model"},  # per model
    "resources": {f.name for f in dataclasses.fields(ResourceConfig)},
}


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _rayjob() -> dict:
    (job,) = [d for d in _load_all("rayjob.yaml") if d.get("kind") == "RayJob"]
    return job


def _assert_documented_keys(cfg: dict) -> None:
    assert isinstance(cfg, dict)
    assert set(cfg) <= set(DOCUMENTED), f"undocumented keys: {set(cfg) - set(DOCUMENTED)}"
    for key in ("manifest", "out", "models"):
        assert cfg.get(key), f"job config needs {key!r}"
    assert isinstance(cfg["models"], list) and all(isinstance(m, str) for m in cfg["models"])
    assert set(cfg.get("tiling") or {}) <= DOCUMENTED["tiling"]
    assert set(cfg.get("resources") or {}) <= DOCUMENTED["resources"]
    encoders = cfg.get("encoders") or {}
    assert set(encoders) <= set(cfg["models"]), "encoder settings for a model not in models"
    for model, opts in encoders.items():
        assert set(opts or {}) <= DOCUMENTED["encoders"], f"{model}: {set(opts) - DOCUMENTED['encoders']}"


# --- Ray cluster launcher (AWS) -------------------------------------------------------------


@pytest.fixture(scope="module")
def aws() -> dict:
    return _load("aws.yaml")


def test_aws_required_keys(aws):
    assert aws["cluster_name"]
    assert aws["provider"]["type"] == "aws"
    assert aws["provider"]["region"]
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    for name, node in types.items():
        assert "resources" in node, name
        assert "InstanceType" in node["node_config"], name
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= aws["max_workers"], name
    assert any("pip install" in c and "pathray" in c for c in aws["setup_commands"])
    assert any("ray start --head" in c for c in aws["head_start_ray_commands"])
    assert any("ray start --address" in c for c in aws["worker_start_ray_commands"])


def test_aws_head_has_no_task_slots(aws):
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0
    assert any("--num-cpus=0" in c for c in aws["head_start_ray_commands"])


def test_aws_cpu_and_gpu_worker_types(aws):
    workers = {k: v for k, v in aws["available_node_types"].items() if k != aws["head_node_type"]}
    instance = {k: v["node_config"]["InstanceType"] for k, v in workers.items()}
    gpu = {k for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    cpu = set(workers) - gpu
    assert cpu and all(workers[k]["resources"].get("CPU", 0) > 0 for k in cpu)
    assert {instance[k] for k in gpu} >= {"g6e.xlarge", "p5.48xlarge"}
    assert workers[[k for k in gpu if instance[k] == "p5.48xlarge"][0]]["resources"]["GPU"] == 8
    for k in workers:  # S3 access through an instance profile, not keys
        assert "IamInstanceProfile" in workers[k]["node_config"], k
    # GPU nodes carry the label that CPU stages steer away from (pathray.job.resources.cpu_placement)
    assert {k for k, v in workers.items() if v.get("labels", {}).get(GPU_NODE_LABEL) == "gpu"} == gpu


def test_aws_validates_against_ray_launcher_schema(aws):
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    util.validate_config(util.prepare_config(dict(aws)))


def test_aws_file_mount_is_what_setup_installs(aws):
    (target,) = [k for k, v in aws["file_mounts"].items() if v in (".", "./")]
    assert any(target in c for c in aws["setup_commands"])


# --- KubeRay RayJob -------------------------------------------------------------------------


def test_rayjob_required_keys():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert ENTRYPOINT in spec["entrypoint"]
    assert shlex.split(spec["entrypoint"])[0] == "python"
    yaml.safe_load(spec["runtimeEnvYAML"])  # must itself be valid YAML
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]


def test_rayjob_worker_groups_cpu_and_gpu():
    groups = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu, cpu = [], []
    for g in groups:
        assert g["groupName"] and "rayStartParams" in g
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        (container,) = g["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        (gpu if int(limits.get("nvidia.com/gpu", 0)) > 0 else cpu).append(g["groupName"])
        labelled = g["rayStartParams"].get("labels") == f"{GPU_NODE_LABEL}=gpu"
        assert labelled == (g["groupName"] in gpu), g["groupName"]  # see pathray.job.resources.cpu_placement
    assert cpu, "need a CPU reader group"
    assert len(gpu) >= 2, "need GPU encoder groups (L40S, H100)"


def test_rayjob_config_is_mounted_where_entrypoint_reads_it():
    docs = _load_all("rayjob.yaml")
    job = _rayjob()
    args = shlex.split(job["spec"]["entrypoint"])
    config_path = args[args.index("--config") + 1]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head["volumes"]}
    matches = [n for n, p in mounts.items() if config_path.startswith(p.rstrip("/") + "/")]
    assert matches, f"{config_path} is not under any head volume mount"
    cm_name = volumes[matches[0]]["configMap"]["name"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name]
    key = config_path.rsplit("/", 1)[1]
    _assert_documented_keys(yaml.safe_load(cm["data"][key]))


def test_rayjob_service_account_for_s3_exists():
    docs = _load_all("rayjob.yaml")
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert all(p.get("serviceAccountName") in accounts for p in pods)


def test_entrypoint_script_exists():
    if not (REPO / ENTRYPOINT).is_file():
        pytest.skip(f"{ENTRYPOINT} not written yet; configs are checked against the path string only")
    out = subprocess.run(
        [sys.executable, str(REPO / ENTRYPOINT), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout


# --- job config example ---------------------------------------------------------------------


def test_job_example_keys_are_documented():
    _assert_documented_keys(_load("job.example.yaml"))


def test_job_example_builds_a_job_config():
    """The real parser accepts it (when pathray.job.config and its imports are in place)."""
    try:
        from pathray.job.config import build_job_config
    except ImportError as exc:
        pytest.skip(f"pathray.job.config not importable yet: {exc}")
    cfg = build_job_config(_load("job.example.yaml"))
    assert list(cfg.models) == ["uni2-h", "virchow2"]


# --- hygiene --------------------------------------------------------------------------------

_SECRET = re.compile(r"(aws_secret_access_key|aws_access_key_id|\bsecret\s*:|AKIA[0-9A-Z]{16})", re.I)


@pytest.mark.parametrize("name", ["aws.yaml", "rayjob.yaml", "job.example.yaml"])
def test_no_credentials_in_configs(name):
    text = (CLUSTER / name).read_text()
    hits = [line for line in text.splitlines() if not line.lstrip().startswith("#") and _SECRET.search(line)]
    assert not hits, f"credentials-looking lines in cluster/{name}: {hits}"


def test_docs_cover_both_launch_paths():
    doc = (REPO / "docs" / "cluster.md").read_text()
    for needle in (
        "ray up cluster/aws.yaml",
        "ray job submit",
        "--working-dir",
        "kubectl apply -f cluster/rayjob.yaml",
        "IRSA",
        "instance profile",
    ):
        assert needle in doc, needle
