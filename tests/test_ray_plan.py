"""The job's Ray Data plan (issue 20, item 15): every stage that claims no GPU is placed by Ray
Data's named arguments (``label_selector`` + ``fallback_strategy`` from
pathray.job.resources.cpu_placement, which Ray Data keeps per operator when it fuses them:
ray/data/_internal/logical/rules/operator_fusion.py INHERITABLE_REMOTE_ARGS), nothing sets the
deprecated ``DataContext.scheduling_strategy`` or passes per-operator ``ray_remote_args``, and
building the real plan, or running, raises no RayDeprecationWarning. The placement itself is
checked on a real two-node Ray cluster (a CPU node, a GPU node)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
from fixtures.slides import write_manifest
from ray.data import ActorPoolStrategy, DataContext
from ray.data.context import DEFAULT_SCHEDULING_STRATEGY
from ray.util.annotations import RayDeprecationWarning

from pathray.job.config import build_job_config
from pathray.job.modelplan import plan_models
from pathray.job.raydata import build_dataset, chain, operators, run_job
from pathray.job.resources import GPU_NODE_LABEL, cpu_placement, gpu_node_ids, plan_resources
from pathray.job.runtime import configure_data_context
from pathray.job.stageplan import build_stages
from pathray.job.stages import ChunkEncoder, ChunkReader, ChunkWriter, SlidePlanner
from pathray.testing import sleep_encoder

pytestmark = pytest.mark.timeout(300)


class RecordedDataset:
    """Stands in for a ``ray.data.Dataset``: records each ``map_batches`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[type, dict]] = []

    def map_batches(self, fn: type, **kwargs) -> RecordedDataset:
        self.calls.append((fn, kwargs))
        return self


def test_every_operator_of_the_plan_is_placed_by_its_own_remote_args(tmp_path):
    config = build_job_config(
        {"manifest": "m.csv", "out": str(tmp_path / "store"), "models": ["kaiko-vits16", "uni"], "chunk_tiles": 8}
    )
    models, unknown = plan_models(config)
    assert not unknown and len(models) == 2
    res = plan_resources(config, {"CPU": 8.0, "GPU": 1.0}, len(models))
    stages = build_stages(config, models, str(tmp_path / "store"), res.encoder_threads)

    placement = cpu_placement(["ab12"])
    ds = chain(RecordedDataset(), operators(stages, res, config.resources.chunks_per_encode_call, placement))

    assert [fn for fn, _ in ds.calls] == [SlidePlanner, ChunkReader, ChunkEncoder, ChunkEncoder, ChunkWriter]
    assert placement == {
        "label_selector": {GPU_NODE_LABEL: "!gpu", "ray.io/node-id": "!in(ab12)"},
        "fallback_strategy": [{"label_selector": {}}],
    }
    for fn, kwargs in ds.calls:
        assert "scheduling_strategy" not in kwargs and "ray_remote_args" not in kwargs, fn
        if fn is ChunkEncoder:  # on GPUs: placed by the GPUs it claims
            assert "label_selector" not in kwargs
        else:
            assert kwargs["label_selector"] == placement["label_selector"], fn
            assert kwargs["fallback_strategy"] == placement["fallback_strategy"], fn
        assert isinstance(kwargs["compute"], ActorPoolStrategy)
        assert kwargs["batch_format"] == "pyarrow"
    encoders = [kwargs for fn, kwargs in ds.calls if fn is ChunkEncoder]
    assert [e["fn_constructor_kwargs"]["model"] for e in encoders] == ["kaiko-vits16", "uni"]
    assert [e["fn_constructor_kwargs"]["drop_pixels"] for e in encoders] == [False, True]
    assert all(e["num_gpus"] == res.encoder_num_gpus and e["fn_constructor_kwargs"]["threads"] for e in encoders)
    assert all(kwargs["num_gpus"] is None for fn, kwargs in ds.calls if fn is not ChunkEncoder)


def test_the_data_context_is_set_up_without_deprecated_settings():
    saved = DataContext.get_current()
    with warnings.catch_warnings():  # Ray's own constructor warns of its renamed fields
        warnings.simplefilter("ignore", DeprecationWarning)
        DataContext._set_current(DataContext())  # a fresh context: the session's own is left as it was
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RayDeprecationWarning)
            configure_data_context(progress_bars=False, object_store_limit_gb=1.0)  # assigning the strategy would raise
        ctx = DataContext.get_current()
        assert ctx.scheduling_strategy == DEFAULT_SCHEDULING_STRATEGY
        assert ctx.execution_options.resource_limits.object_store_memory == 2**30
    finally:
        DataContext._set_current(saved)


@pytest.mark.filterwarnings("error::ray.util.annotations.RayDeprecationWarning")
def test_a_tiny_local_run_raises_no_ray_deprecation_warning(synthetic_svs_05, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [{"path": str(synthetic_svs_05)}])
    config = build_job_config(
        {
            "manifest": str(manifest),
            "out": str(tmp_path / "store"),
            "models": ["sleep"],
            "tiling": {"tile_px": 224, "target_mpp": 0.5},
            "chunk_tiles": 4,
            "runner": "local",
        }
    )
    report = run_job(config, {"sleep": sleep_encoder(tiles_per_s=1e5)}, progress_bars=False)
    assert report.exit_code == 0 and report.per_model["sleep"]["ok"] == 1


@pytest.mark.filterwarnings("error::ray.util.annotations.RayDeprecationWarning")
def test_building_the_real_ray_data_plan_raises_no_ray_deprecation_warning(ray_cluster, tmp_path):
    import ray

    config = build_job_config({"manifest": "m.csv", "out": str(tmp_path / "s"), "models": ["kaiko-vits16"]})
    models, _ = plan_models(config)
    res = plan_resources(config, {"CPU": 2.0}, len(models))
    stages = build_stages(config, models, str(tmp_path / "s"), res.encoder_threads)
    todo = [{"slide_id": "s", "path": "s.svs", "mpp": None, "cohort": None, "models": ["kaiko-vits16"]}]
    ds = build_dataset(stages, res, todo, 1, cpu_placement(gpu_node_ids(ray.nodes())))
    assert "MapBatches(ChunkWriter)" in str(ds)  # planned, not run


PLACEMENT_PROBE = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from pathray.job.resources import GPU_NODE_LABEL, cpu_placement, gpu_node_ids

@ray.remote(num_cpus=1)
class Where:
    def node(self):
        return ray.get_runtime_context().get_node_id()

temp_dir = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir})
try:
    nodes = {
        "cpu": cluster.add_node(num_cpus=1),
        "gpu": cluster.add_node(num_cpus=1, num_gpus=1),  # known by its GPU only
        "labelled": cluster.add_node(num_cpus=1, labels={GPU_NODE_LABEL: "gpu"}),  # by its label only
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    placement = cpu_placement(gpu_node_ids(ray.nodes()))
    names, actors, got = {node.node_id: name for name, node in nodes.items()}, [], []
    for _ in nodes:  # one at a time, each kept alive: each holds its node's only CPU
        actors.append(Where.options(**placement).remote())
        got.append(ray.get(actors[-1].node.remote(), timeout=60))
    print(json.dumps({"gpu_nodes": [names.get(n) for n in gpu_node_ids(ray.nodes())], "placed": [names[n] for n in got]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_cpu_stages_prefer_cpu_nodes_and_fall_back_to_gpu_nodes():
    """A real cluster (its own process) of a 1-CPU node, a 1-CPU 1-GPU node and a 1-CPU node
    labelled as a GPU node type: the first CPU-stage actor goes to the CPU node (the GPU node
    excluded by its id, the labelled one by its label); the next two, with the CPU node full, to
    the other two (a soft preference, as Ray's hybrid scheduling gave)."""
    temp_dir = tempfile.mkdtemp(prefix="pr-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    done = subprocess.run(
        [sys.executable, "-c", PLACEMENT_PROBE, temp_dir], capture_output=True, text=True, timeout=200
    )
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["gpu_nodes"] == ["gpu"] and got["placed"][0] == "cpu", got
    assert sorted(got["placed"][1:]) == ["gpu", "labelled"], got
