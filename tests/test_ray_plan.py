"""The job's Ray Data plan, checked without a cluster (issue 20, item 15): every operator is
placed by its own remote args (pathray.job.resources.PLACEMENT, which Ray Data keeps per
operator when it fuses them: ray/data/_internal/logical/rules/operator_fusion.py
INHERITABLE_REMOTE_ARGS), nothing sets the deprecated ``DataContext.scheduling_strategy``,
and a run raises no RayDeprecationWarning of its own."""

from __future__ import annotations

import warnings

import pytest
from fixtures.slides import write_manifest
from ray.data import ActorPoolStrategy, DataContext
from ray.data.context import DEFAULT_SCHEDULING_STRATEGY
from ray.util.annotations import RayDeprecationWarning

from pathray.job.config import build_job_config
from pathray.job.modelplan import plan_models
from pathray.job.raydata import chain, operators, run_job
from pathray.job.resources import PLACEMENT, plan_resources
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

    ds = chain(RecordedDataset(), operators(stages, res, config.resources.chunks_per_encode_call))

    assert [fn for fn, _ in ds.calls] == [SlidePlanner, ChunkReader, ChunkEncoder, ChunkEncoder, ChunkWriter]
    for fn, kwargs in ds.calls:
        assert kwargs["scheduling_strategy"] == PLACEMENT["scheduling_strategy"] == "DEFAULT", fn
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
