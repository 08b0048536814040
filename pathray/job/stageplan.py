"""The job's stages, built from its config in one place for every runner.

:func:`build_stages` turns a :class:`~pathray.job.config.JobConfig` and the run's models into
the constructor arguments of the stages of :mod:`pathray.job.stages`. The Ray runner hands
each :class:`Stage` to Ray Data (its actors build it); the local runner and the dry run build
it in this process (:meth:`Stage.build`). Nothing here imports Ray or opens a slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pathray.job.config import JobConfig
from pathray.job.modelplan import ModelPlan
from pathray.job.stages import ChunkEncoder, ChunkReader, ChunkWriter, SlidePlanner


@dataclass(frozen=True)
class Stage:
    """One stage: a callable class of :mod:`pathray.job.stages` and its constructor's keyword
    arguments (picklable: a Ray actor builds it from them)."""

    fn: type
    kwargs: dict[str, Any]

    def build(self) -> Any:
        """The stage's callable, built in this process."""
        return self.fn(**self.kwargs)


@dataclass(frozen=True)
class JobStages:
    """The stages of one run: plan -> read -> encode (one per model, in the run's model order;
    the last one drops the pixels) -> write."""

    plan: Stage
    read: Stage
    encode: tuple[Stage, ...]
    write: Stage


def build_stages(
    config: JobConfig, models: Sequence[ModelPlan], store_root: str, encoder_threads: int | None = None
) -> JobStages:
    """The stages of a run of ``models`` writing to the store at ``store_root``.

    Planner and reader cut every tiling group of ``models`` (:meth:`JobConfig.tiling_groups`;
    no models: the config's tiling) and read slides with the config's slide storage options
    through the node's scratch cache (``scratch_dir``, ``scratch_max_bytes``); each encoder
    builds its model with :attr:`ModelPlan.factory` and runs ``encoder_threads`` torch threads
    (``None``: torch's default); the writer stages each model's embeddings as its output dtype."""
    names = [m.name for m in models]
    groups = config.tiling_groups(names)
    slide_access = dict(
        storage_options=config.slide_options, scratch_dir=config.scratch_dir, scratch_max_bytes=config.scratch_max_bytes
    )
    encode = tuple(
        Stage(
            ChunkEncoder,
            dict(
                model=m.name,
                make_encoder=m.factory,
                drop_pixels=i == len(models) - 1,
                threads=encoder_threads,
                output_dtype=m.output_dtype,
            ),
        )
        for i, m in enumerate(models)
    )
    writer = dict(
        root=store_root,
        storage_options=config.storage_options,
        models=names,
        embedding_types={m.name: m.output_dtype for m in models},
    )
    return JobStages(
        plan=Stage(SlidePlanner, dict(tiling=groups, chunk_tiles=config.chunk_tiles, **slide_access)),
        read=Stage(ChunkReader, dict(tiling=groups, **slide_access)),
        encode=encode,
        write=Stage(ChunkWriter, writer),
    )
