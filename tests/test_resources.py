"""Resource planning: pools sized from the cluster never oversubscribe it (a Ray Data job
whose actors take every CPU hangs silently, with no task slot left for planning/writing)."""

from __future__ import annotations

import pytest

from pathray.job.config import build_job_config
from pathray.job.resources import plan_resources


def job(models, **resources):
    return build_job_config({"manifest": "m.csv", "out": "o", "models": models, "resources": resources})


@pytest.mark.parametrize("cpus", [2, 4, 16])
@pytest.mark.parametrize("models", [["kaiko-vits16"], ["kaiko-vits16", "uni"], ["uni", "virchow2", "h-optimus-0"]])
def test_cpu_only_plan_fits_the_cluster(cpus, models):
    r = plan_resources(job(models), {"CPU": cpus}, len(models))
    claimed = (
        r.plan_num_cpus * r.planners
        + r.write_num_cpus * r.writers
        + r.encoder_num_cpus * r.encoder_actors * len(models)
        + r.reader_num_cpus * r.readers
    )
    assert claimed <= cpus + 1e-9
    assert r.readers >= 1 and r.encoder_actors >= 1 and r.encoder_num_gpus == 0


def test_gpu_cluster_shares_gpus_between_models_and_gives_readers_the_rest():
    r = plan_resources(job(["uni2-h", "virchow2"]), {"CPU": 64, "GPU": 8}, 2)
    assert (r.encoder_actors, r.encoder_num_gpus) == (8, 0.5)  # one actor per GPU per model
    assert r.encoder_actors * r.encoder_num_gpus * 2 == 8
    assert r.readers * r.reader_num_cpus + r.encoder_num_cpus * 16 + 0.25 * (r.planners + r.writers) <= 64
    assert (r.planners, r.writers) == (2, 2)
    assert r.readers >= 40


def test_explicit_resources_win():
    r = plan_resources(
        job(["uni"], readers=3, encoder_actors=2, encoder_num_gpus=0.25, reader_num_cpus=2), {"CPU": 64, "GPU": 8}, 1
    )
    assert (r.readers, r.encoder_actors, r.encoder_num_gpus, r.reader_num_cpus) == (3, 2, 0.25, 2)


def test_gpu_intent_holds_on_an_autoscaling_cluster_that_starts_without_gpus():
    # a fresh cluster: CPU-less head, no worker nodes yet
    r = plan_resources(
        job(["uni2-h", "virchow2"], encoder_num_gpus=0.5, encoder_actors=8, encoder_actors_min=1, readers=64),
        {"CPU": 0},
        2,
    )
    assert (r.encoder_num_gpus, r.encoder_actors, r.encoder_actors_min, r.readers) == (0.5, 8, 1, 64)
    assert r.encoder_num_cpus > 0


def test_cpu_only_encoders_get_the_cores_and_threads_to_use_them():
    """On a 2-CPU machine the model, ~50x slower than decoding, gets 1.25 CPUs and 2 torch
    threads (Ray alone would leave a fractional actor at OMP_NUM_THREADS=1: half the machine)."""
    r = plan_resources(job(["kaiko-vits16"]), {"CPU": 2}, 1)
    assert (r.encoder_num_cpus, r.encoder_threads, r.readers, r.reader_num_cpus) == (1.25, 2, 1, 0.25)
    two = plan_resources(job(["kaiko-vits16", "uni"]), {"CPU": 16}, 2)
    assert two.encoder_threads * 2 <= 16 and two.encoder_threads >= 7


def test_a_fractional_encoder_actor_runs_the_planned_torch_threads(ray_cluster):
    import ray

    from pathray.job.stages import ChunkEncoder
    from pathray.testing import sleep_encoder

    @ray.remote(num_cpus=0.5)
    class Probe:
        def __init__(self, threads):
            self.stage = ChunkEncoder("m", sleep_encoder(tiles_per_s=1e6).factory, True, threads=threads)

        def threads(self):
            import torch

            return torch.get_num_threads()

    assert ray.get(Probe.remote(None).threads.remote()) == 1  # Ray's default for a fractional actor
    assert ray.get(Probe.remote(2).threads.remote()) == 2
