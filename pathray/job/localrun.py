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

import os
import queue
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pathray.job.config import JobConfig
from pathray.job.modelplan import ModelPlan
from pathray.job.stages import SLIDE_SCHEMA, ChunkEncoder, ChunkReader, ChunkWriter, SlidePlanner

#: chunks planned and read ahead of the encoder (each ~ chunk_tiles x 150 KB of pixels)
READ_AHEAD_CHUNKS = 2
_DONE = object()


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


def prepare_encoders(config: JobConfig, models: list[ModelPlan]) -> Future:
    """Build every model's encode stage on a thread and return the future of the list: the
    models load while the driver reads the manifest, takes the store's lease (its settle
    time is a sleep) and plans the first slide, instead of after. Nothing is written."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="pathray-model-load")
    future = executor.submit(
        lambda: [
            ChunkEncoder(m.name, m.factory, drop_pixels=i == len(models) - 1, output_dtype=m.output_dtype)
            for i, m in enumerate(models)
        ]
    )
    executor.shutdown(wait=False)
    return future


def local_results(
    config: JobConfig, store_root: str, models: list[ModelPlan], todo: list[dict], encoders: Future
) -> Iterator[pa.Table]:
    """Result tables (:data:`pathray.job.stages.RESULT_SCHEMA`) of ``todo``'s slides, computed in
    this process by the Ray plan's own stages, in manifest order; ``encoders`` is
    :func:`prepare_encoders`' future. Closing the generator stops the read-ahead thread."""
    staging = dict(
        storage_options=config.slide_options, scratch_dir=config.scratch_dir, scratch_max_bytes=config.scratch_max_bytes
    )
    groups = config.tiling_groups([m.name for m in models])
    planner = SlidePlanner(groups, config.chunk_tiles, **staging)
    reader = ChunkReader(groups, **staging)
    ahead = _ReadAhead(planner, reader, todo)
    try:
        writer = ChunkWriter(
            store_root, config.storage_options, [m.name for m in models], {m.name: m.output_dtype for m in models}
        )
        stages = encoders.result()
        for chunk in ahead:
            for encoder in stages:
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
