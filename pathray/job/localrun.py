"""The in-process runner: the job's own stages chained in the driver, for machines where
Ray's processes cost more than they give.

On a CPU-only machine the model is the slow stage by ~50x and torch already spreads one
encode call over every core, so Ray's pools can only add fixed costs: a local cluster to
start and stop, five worker processes importing their stacks, and the objects moved
between them (measured in docs/benchmarks.md). This runner chains the *same* stage
callables (:mod:`pathray.job.stages`) in one process: a read-ahead thread plans slides and
reads chunks (JPEG decoding releases the GIL) while the main thread encodes them with
every model in turn and stages them; the driver loop, the tracker, the commit protocol,
the ledger and the report are the ones the Ray runner uses, so the store it writes is the
same, row for row and byte for byte in the embeddings.

:func:`choose_runner` picks it for ``runner: auto`` only when there is no Ray cluster to
use (no address, no ``RAY_ADDRESS``, Ray not already initialised) and no GPU.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pathray.job.committers import LocalCommitPool
from pathray.job.config import JobConfig
from pathray.job.drive import RunContext, drive
from pathray.job.rows import SLIDE_SCHEMA
from pathray.job.stageplan import JobStages, Stage, build_stages
from pathray.job.stages import ChunkReader, SlidePlanner

#: chunks planned and read ahead of the encoder (each ~ chunk_tiles x 150 KB of pixels)
READ_AHEAD_CHUNKS = 2
_DONE = object()

log = logging.getLogger("pathray")


def choose_runner(config: JobConfig | Any) -> str:
    """``"ray"`` or ``"local"`` for a job (or aggregate) config with ``runner`` and
    ``ray_address``: ``config.runner`` unless it is ``"auto"``; then ``"ray"`` when
    there is a cluster to join (``ray_address``, ``RAY_ADDRESS`` as in a submitted job, or an
    initialised Ray) or a GPU on this machine, else ``"local"``."""
    if config.runner != "auto":
        return config.runner
    if config.ray_address or os.environ.get("RAY_ADDRESS") or _ray_initialized():
        return "ray"
    from pathray.job.resources import local_gpus

    return "ray" if local_gpus() > 0 else "local"


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never imported: certainly not initialised (and no import cost)
    return bool(ray is not None and ray.is_initialized())


def prepare_encoders(encode: Sequence[Stage]) -> Future:
    """Build every model's encode stage (``encode``: :attr:`JobStages.encode`) on a thread and
    return the future of the list: the models load while the driver takes the store's lease (its
    settle time is a sleep) and plans the first slide, instead of after. Nothing is written."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="pathray-model-load")
    future = executor.submit(lambda: [stage.build() for stage in encode])
    executor.shutdown(wait=False)
    return future


def run_local(run: RunContext, todo: list[dict]) -> None:
    """Run the slide rows ``todo`` through the job's stages in this process and drive their
    results (:func:`pathray.job.drive.drive`): no Ray at all."""
    import torch

    run.report.resources = {
        "encoder_threads": torch.get_num_threads(),
        "read_ahead_chunks": READ_AHEAD_CHUNKS,
        "committers": 1,
    }
    log.info("runner: local (the stages in this process, no Ray), %d torch threads", torch.get_num_threads())
    pool = LocalCommitPool(run.store)
    results = local_results(build_stages(run.config, run.models, run.store.root), todo, run.encoders)
    try:
        drive(results, pool, run)
    finally:
        results.close()
        pool.close()


def local_results(stages: JobStages, todo: list[dict], encoders: Future) -> Iterator[pa.Table]:
    """Result tables (:data:`pathray.job.rows.RESULT_SCHEMA`) of ``todo``'s slides, computed in
    this process by the Ray plan's own stages, in manifest order; ``encoders`` is
    :func:`prepare_encoders`' future. Closing the generator stops the read-ahead thread."""
    planner, reader = stages.plan.build(), stages.read.build()
    ahead = _ReadAhead(planner, reader, todo)
    try:
        writer = stages.write.build()
        encode = encoders.result()
        for chunk in ahead:
            for encoder in encode:
                chunk = encoder(chunk)
            yield writer(chunk)
    finally:
        ahead.stop()
        reader.close()
        planner.scratch.close()


class _ReadAhead:
    """A thread planning each slide and reading its chunks into a bounded queue; iterating
    yields the read chunk tables (one row each) and re-raises the thread's unexpected error.
    Per-slide failures are rows, as in the Ray plan, never raised."""

    def __init__(self, planner: SlidePlanner, reader: ChunkReader, todo: list[dict]):
        self.planner, self.reader, self.todo = planner, reader, todo
        self.queue: queue.Queue = queue.Queue(maxsize=READ_AHEAD_CHUNKS)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pathray-read-ahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for slide in self.todo:
                chunks = self.planner(pa.Table.from_pylist([slide], schema=SLIDE_SCHEMA))
                for read in self.reader(chunks):
                    if not self._put(read):
                        return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            self._put(exc)

    def _put(self, item: Any) -> bool:
        """Queue ``item`` unless the consumer stopped; False when it did."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[pa.Table]:
        while (item := self.queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        """Stop the thread and wait for it (it finishes at most the chunk it is reading)."""
        self.stopping.set()
        self.thread.join()
