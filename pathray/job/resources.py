"""Resource planning: how many actors each stage gets and what each claims, from the cluster.

See :func:`plan_resources` for the arithmetic; ``resources:`` in the job config pins any of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pathray.job.config import JobConfig, ResourceConfig

#: The node label that marks a GPU node for pathray (cluster/*.yaml set it on their GPU node types;
#: ``ray start --labels '{"pathray.io/node-kind": "gpu"}'`` by hand).
GPU_NODE_LABEL = "pathray.io/node-kind"


def cpu_placement(gpu_node_ids: Iterable[str] = ()) -> dict[str, Any]:
    """Ray Data's named placement arguments (``label_selector``, ``fallback_strategy``) for a stage
    that needs no GPU: prefer nodes that are not GPU nodes, i.e. neither labelled
    :data:`GPU_NODE_LABEL` ``= gpu`` nor among ``gpu_node_ids`` (the GPU nodes alive when the run is
    planned: a cluster nobody labelled), and fall back to any node when those are full or absent (a
    single GPU machine; an 8-GPU node whose CPUs also host readers). A soft preference, as Ray's
    hybrid scheduling gave; Ray 2.60 deprecates the per-operator ``scheduling_strategy`` it took."""
    selector = {GPU_NODE_LABEL: "!gpu"}
    ids = sorted(gpu_node_ids)
    if ids:
        selector["ray.io/node-id"] = f"!in({', '.join(ids)})"
    return {"label_selector": selector, "fallback_strategy": [{"label_selector": {}}]}


def gpu_node_ids(nodes: list[dict[str, Any]]) -> list[str]:
    """The ids of the alive nodes of ``nodes`` (``ray.nodes()``) that have GPUs."""
    return [n["NodeID"] for n in nodes if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]


@dataclass
class Resources:
    """Resolved resource plan (what :func:`plan_resources` decided)."""

    readers: int
    reader_num_cpus: float
    encoder_actors: int
    encoder_actors_min: int
    encoder_num_gpus: float
    encoder_num_cpus: float
    #: torch intra-op threads per encoder actor: its CPU share rounded up (Ray would leave torch
    #: at OMP_NUM_THREADS=1 for a fractional actor; the planner's and writer's reservations are
    #: idle most of a run, so the encoder uses them)
    encoder_threads: int
    planners: int
    plan_num_cpus: float
    writers: int
    write_num_cpus: float


def plan_resources(config: JobConfig, cluster: dict[str, float], n_models: int) -> Resources:
    """Size the pools from the cluster's CPUs/GPUs unless the config pins them.

    With GPUs: each model gets one actor per GPU at ``1/n_models`` GPU each (models share
    GPUs), one CPU per GPU feeds the encoders, and reader actors (1 CPU each) take the
    CPUs left after the planner and writer pools (one small actor per 32 CPUs each).
    Without GPUs (laptop, CI): readers get an eighth of the CPUs left after the planner and
    writer pools (at least 0.25, at most 1 CPU each), encoders the rest, all fractional so
    nothing deadlocks on a 2-CPU machine; each encoder runs ``encoder_threads`` torch threads
    (2 CPUs: 0.25 + 0.25 plan/write, 0.25 reader, 1.25 encoder -> 2 threads). Every actor pool's maximum is
    reserved, so autoscaling can never starve another stage.

    Derived sizes use the resources present when the job starts. On an autoscaling cluster
    that starts without GPU nodes, set ``encoder_num_gpus`` (GPU actors are then requested
    and the autoscaler adds GPU nodes), ``encoder_actors`` and ``readers`` explicitly;
    ``encoder_actors_min`` lets encoding start on the first GPU node.
    """
    r = config.resources
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    planners = r.planners or max(1, int(cpus // 32))
    writers = r.writers or max(1, int(cpus // 32))
    task_reserve = r.plan_num_cpus * planners + r.write_num_cpus * writers
    if gpus > 0 or (r.encoder_num_gpus or 0) > 0:
        enc_gpus, enc_actors, enc_cpus, reader_cpus = _gpu_encoders(r, cpus - task_reserve, gpus, n_models)
    else:
        enc_gpus, enc_actors, enc_cpus, reader_cpus = _cpu_encoders(r, cpus - task_reserve, n_models)
    left = cpus - task_reserve - enc_cpus * enc_actors * n_models
    readers = r.readers or max(1, int(left / reader_cpus + 1e-9))
    return Resources(
        readers=readers,
        reader_num_cpus=reader_cpus,
        encoder_actors=enc_actors,
        encoder_actors_min=min(r.encoder_actors_min or enc_actors, enc_actors),
        encoder_num_gpus=enc_gpus,
        encoder_num_cpus=enc_cpus,
        encoder_threads=max(1, math.ceil(enc_cpus - 1e-9)),
        planners=planners,
        plan_num_cpus=r.plan_num_cpus,
        writers=writers,
        write_num_cpus=r.write_num_cpus,
    )


def _gpu_encoders(r: ResourceConfig, cpus_free: float, gpus: float, n_models: int) -> tuple[float, int, float, float]:
    """``(GPUs per encoder, encoders per model, CPUs per encoder, CPUs per reader)`` with GPUs:
    one actor per GPU per model at ``1/n_models`` GPU each, one CPU per GPU feeding them
    (``cpus_free``: the CPUs the planner and writer pools leave)."""
    enc_gpus = r.encoder_num_gpus if r.encoder_num_gpus is not None else 1.0 / n_models
    enc_actors = r.encoder_actors or max(1, int(gpus / enc_gpus / n_models))
    enc_cpus = (
        r.encoder_num_cpus
        if r.encoder_num_cpus is not None
        else min(1.0, max(cpus_free, 0.5) / (enc_actors * n_models * 2))
    )
    return enc_gpus, enc_actors, enc_cpus, r.reader_num_cpus or 1.0


def _cpu_encoders(r: ResourceConfig, cpus_free: float, n_models: int) -> tuple[float, int, float, float]:
    """``(GPUs per encoder, encoders per model, CPUs per encoder, CPUs per reader)`` without
    GPUs: on CPUs the model is the slow stage by ~50x (decode: ~500-2,000 tiles/s/core; ViT-S:
    ~8 tiles/s/core), so readers get an eighth of ``cpus_free`` (0.25-1 CPU each) and the
    encoders the rest."""
    enc_actors = r.encoder_actors or 1
    budget = max(cpus_free, 0.5)
    reader_cpus = r.reader_num_cpus or min(1.0, max(0.25, budget / 8))
    enc_cpus = (
        r.encoder_num_cpus
        if r.encoder_num_cpus is not None
        else max(budget - reader_cpus, 0.25) / (enc_actors * n_models)
    )
    return r.encoder_num_gpus or 0.0, enc_actors, enc_cpus, reader_cpus


def local_gpus() -> int:
    """GPUs torch sees on this machine (0 without CUDA or torch)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0
