"""The Ray runtime of a run, set up the same way by every job that runs on Ray (``pathray
embed`` and ``pathray aggregate``): its run id, joining or starting Ray, Ray Data's context,
placement included: per operator, by Ray Data's named arguments
(:func:`pathray.job.resources.cpu_placement`), never through ``DataContext.scheduling_strategy``
or per-operator ``ray_remote_args``, which Ray 2.60 deprecates.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

log = logging.getLogger("pathray")


def new_run_id(prefix: str = "") -> str:
    """``<prefix><UTC timestamp>-<6 hex>``: a run's default name."""
    return prefix + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def quiet_local_ray_env() -> None:
    """Before ``ray.init`` starts a local Ray: enable the token authentication Ray enables by
    default for a new local cluster, the way Ray does it (its ``_enable_token_auth``: the
    ``RAY_AUTH_MODE=token`` environment variable, then its cached config refreshed), but
    explicitly, which is what Ray's start-up WARNING asks for. A mode the user set is kept;
    on another Ray version without that helper, nothing changes (Ray warns as before)."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:
        return
    _enable_token_auth()


def init_ray(address: str | None, progress_bars: bool) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``, as in a submitted job), or with
    neither start a local Ray (quietly, see :func:`quiet_local_ray_env`; without a dashboard, which
    would die with the run); nothing when Ray is already initialised. ``progress_bars``:
    whether the workers' logs reach this process."""
    import ray

    if ray.is_initialized():
        return
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        quiet_local_ray_env()
    ray.init(
        address=address,
        log_to_driver=progress_bars,
        **({"include_dashboard": False} if local else {}),
    )


def configure_data_context(progress_bars: bool, object_store_limit_gb: float | None = None) -> None:
    """Set Ray Data's context for a run: its progress bars on or off, blocks in any order
    (``preserve_order`` off), and ``object_store_limit_gb`` (GiB) as the object store memory
    the run may use (``None``: Ray Data's default). No plan printed at the start, and
    no per-30-s "operator uses N GiB per worker" warning (it fires for every model actor, whose
    memory is the model's, held on purpose; the run reports its own progress)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False
    ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    if object_store_limit_gb:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=int(object_store_limit_gb * 2**30)
        )


def kill_stage_actors(since: float) -> None:
    """Kill this job's Ray Data stage actors started since ``since`` (unix s) after an abort.

    When its no-progress timeout fires, Ray Data releases the pools' actors without killing
    them, so an actor stuck in a task (a stalled encoder) would keep its CPUs until the task
    ends and starve a re-run in the same session. Uses Ray 2.60's actor table (pinned); if
    that is unavailable the run still aborts cleanly, only without this clean-up."""
    import ray

    try:
        from ray._private.state import actors
        from ray._raylet import ActorID

        job = ray.get_runtime_context().get_job_id()
        core = ray._private.worker.global_worker.core_worker
        for actor_id, info in actors().items():
            if (
                info.get("State") == "ALIVE"
                and info.get("JobID") == job
                and info.get("StartTime", 0) >= since * 1000
                and str(info.get("ActorClassName", "")).startswith("MapWorker(")
            ):
                ray.kill(core.get_actor_handle(ActorID.from_hex(actor_id)))
    except Exception as exc:  # noqa: BLE001 - clean-up must never hide the abort's own error
        log.warning("could not kill the aborted run's stage actors: %s", exc)
