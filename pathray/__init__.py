"""pathray: whole-slide images to foundation-model tile embeddings, at cluster scale.

The public face, for notebooks and scripts (the CLI, ``pathray --help``, does the same)::

    import pathray

    pathray.list_models()                       # the tile encoders pathray runs
    report = pathray.embed("manifest.csv", "s3://bucket/store", ["uni2-h"])
    store = pathray.open_store("s3://bucket/store")
    store.dataset("uni2-h")                     # a pyarrow dataset of committed tiles
    pathray.aggregate("s3://bucket/store", "conch-v1.5", "titan")

Heavy modules (Ray, torch) are imported by the call that needs them, not by ``import pathray``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pathray.job.report import RunReport
    from pathray.slide_level.job import AggregateReport
    from pathray.store import FeatureStore


def list_models() -> list[str]:
    """Names of the registered tile encoders (``pathray models`` lists them with their facts)."""
    from pathray.encoders import list_models as registered

    return registered()


def open_store(root: str, storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """The feature store at ``root`` (a local path or ``s3://`` URI; ``storage_options``: s3fs options)."""
    from pathray.store import FeatureStore

    return FeatureStore(root, storage_options)


def embed(manifest: str, out: str, models: list[str], **options: Any) -> RunReport:
    """Embed every slide of ``manifest`` with ``models`` into the store at ``out``, as ``pathray embed``.

    ``options`` are the job config's other keys (``tiling``, ``encoders``, ``resources``, ``runner``, ...,
    as in the YAML config: see :func:`pathray.job.config.build_job_config`). Per-slide failures end as
    error rows and a non-zero ``exit_code`` on the returned report; they never raise."""
    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job

    config = build_job_config(dict(options, manifest=manifest, out=out, models=list(models)))
    return run_job(config, progress_bars=False)


def aggregate(store: str, model: str, aggregator: str, **options: Any) -> AggregateReport:
    """Pool ``model``'s committed tile features of every slide in ``store`` with ``aggregator`` into
    ``slide_features/``, as ``pathray aggregate`` (``options``: the other fields of
    :class:`pathray.slide_level.job.AggregateConfig`, e.g. ``weights``, ``runner``)."""
    from pathray.slide_level.job import AggregateConfig, run_aggregate

    config = AggregateConfig(store=store, model=model, aggregator=aggregator, **options)
    return run_aggregate(config, progress_bars=False)
