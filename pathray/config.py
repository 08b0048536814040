"""Typed configuration of one embedding job, loadable from YAML with CLI overrides.

A YAML job file uses the field names below, e.g.::

    manifest: s3://bucket/manifests/tcga-brca.csv
    out: s3://bucket/stores/brca
    models: [uni2-h, virchow2]
    tiling: {tile_px: 224, target_mpp: 0.5, min_tissue_fraction: 0.25}
    encoders:
      uni2-h: {dtype: bf16, batch_size: 256}
      virchow2: {weights: /mnt/weights/virchow2, dtype: fp16}
    resources: {readers: 32, encoder_actors: 8}
    keep_columns: [case_id, label]

Tiling defaults to the first model's native tile (px) and µm/px when not given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml

from pathray.encoders import EncoderConfig, get_spec
from pathray.encoders.loading import weights_identity
from pathray.encoders.registry import native_tile_mismatch
from pathray.errors import UnknownModelError
from pathray.staging import DEFAULT_MAX_BYTES
from pathray.tiling import TilingConfig
from pathray.tissue import TissueConfig


@dataclass(frozen=True)
class ResourceConfig:
    """How the job claims cluster resources. ``None`` fields are derived from the cluster
    (see :func:`pathray.resources.plan_resources`)."""

    readers: int | None = None  # max reader actors (autoscaled between 1 and this)
    reader_num_cpus: float | None = None  # CPUs per reader actor
    encoder_actors: int | None = None  # actors per model (the pool's maximum)
    encoder_actors_min: int | None = None  # autoscale from this many (default: fixed at encoder_actors)
    encoder_num_gpus: float | None = None  # GPUs per encoder actor (fractional allowed)
    encoder_num_cpus: float | None = None  # CPUs per encoder actor
    planners: int | None = None  # max planning actors (open slide, detect tissue, lay grid)
    plan_num_cpus: float = 0.25  # CPUs per planning actor
    writers: int | None = None  # max writer actors (stage chunk files)
    write_num_cpus: float = 0.25  # CPUs per writer actor
    chunks_per_encode_call: int = 1  # chunk rows per encoder batch
    committers: int | None = None  # commit actors (default: one per 16 cluster CPUs, see pathray.commit)
    max_inflight_finalize: int = 16  # concurrent commits the driver keeps in flight, per committer
    object_store_limit_gb: float | None = None  # cap Ray Data's object-store use (default: Ray Data's own budget)


@dataclass(frozen=True)
class JobConfig:
    """One run: manifest -> tiles -> embeddings for ``models`` -> store at ``out``."""

    manifest: str
    out: str
    models: tuple[str, ...]
    tiling: TilingConfig
    encoders: dict[str, EncoderConfig]
    resources: ResourceConfig = ResourceConfig()
    chunk_tiles: int = 256  # tiles per work unit (read + encode + staged file)
    keep_columns: tuple[str, ...] = ()  # manifest columns copied onto every tile row
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # s3fs options; never written
    #: s3fs options for reading slides only (e.g. ``{"anon": True}`` for a public bucket such as
    #: IDC's while the manifest and store use ``storage_options``); None: ``storage_options``.
    #: Given, slides never inherit the store's endpoint (nor AWS_ENDPOINT_URL): name theirs in
    #: ``client_kwargs.endpoint_url``, or they are read from AWS
    slide_storage_options: dict[str, Any] | None = field(default=None, repr=False)
    scratch_dir: str | None = None  # node-wide cache for staged s3:// slides (default: <tmp>/pathray-scratch-<uid>)
    scratch_max_bytes: int = DEFAULT_MAX_BYTES  # bound on that cache per node (all actors of the node together)
    new_version: bool = False  # on a config mismatch, write a new version under out/versions/
    ray_address: str | None = None  # None: the cluster of `ray job submit`, else a local one
    #: "ray": the Ray Data plan; "local": the same stages in the driver process, no Ray
    #: (pathray.localrun); "auto": local only with no Ray cluster to join and no GPU here
    runner: str = "auto"
    run_id: str | None = None  # default: UTC timestamp + random suffix

    def public_dict(self) -> dict[str, Any]:
        """JSON-able view for the run record (storage options left out: they may hold secrets)."""
        d = dataclasses.asdict(self)
        d.pop("storage_options")
        d.pop("slide_storage_options")
        return d

    @property
    def slide_options(self) -> dict[str, Any] | None:
        """The s3fs options slides are read with (:func:`pathray.fs.slide_storage_options`:
        the store's, or with ``slide_storage_options`` given, a client of their own that
        never inherits the store's endpoint)."""
        from pathray.fs import slide_storage_options

        return slide_storage_options(self.storage_options, self.slide_storage_options)


RUNNERS = ("auto", "ray", "local")


def tiling_record(tiling: TilingConfig) -> dict[str, Any]:
    return {**tiling.to_dict(), "fingerprint": tiling.fingerprint()}


def model_record(name: str, cfg: EncoderConfig) -> dict[str, Any]:
    """What defines a model's embeddings in the store: architecture, preprocessing,
    pooling, weight source and precision. Its ``fingerprint`` guards store versions."""
    spec = get_spec(name)
    record = {
        "model": name,
        "architecture": spec.architecture,
        "model_kwargs": {k: repr(v) for k, v in sorted(spec.model_kwargs.items())},
        "preprocess": spec.preprocess.describe(),
        "pooling": spec.pooling,
        "embed_dim": spec.embed_dim,
        **({"builder": spec.builder} if spec.builder != "timm" else {}),  # timm records predate builders
        "weights": weights_identity(spec, cfg.weights),  # content, not location (see weights_identity)
        "dtype": cfg.dtype,
        "output_dtype": cfg.output_dtype,
    }
    record["fingerprint"] = fingerprint(record)
    return record


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_job_config(raw: dict[str, Any]) -> JobConfig:
    """Build a :class:`JobConfig` from a plain dict (YAML file merged with CLI options).

    Unknown keys raise ``ValueError``; unknown model names are kept (the job records them
    as errors and runs the others)."""
    raw = dict(raw)
    known = {f.name for f in dataclasses.fields(JobConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown job config keys: {sorted(unknown)}; known: {sorted(known)}")
    for key in ("manifest", "out", "models"):
        if not raw.get(key):
            raise ValueError(f"job config needs {key!r}")
    if raw.get("runner", "auto") not in RUNNERS:
        raise ValueError(f"runner {raw['runner']!r}: expected one of {', '.join(RUNNERS)}")
    models = raw["models"]
    models = tuple(m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip())
    encoder_raw = raw.get("encoders") or {}
    encoders = {m: EncoderConfig(model=m, **{k: v for k, v in (encoder_raw.get(m) or {}).items() if k != "model"})
                for m in models}
    raw.update(
        models=models,
        encoders=encoders,
        tiling=_tiling(raw.get("tiling") or {}, models),
        resources=ResourceConfig(**(raw.get("resources") or {})),
        keep_columns=tuple(raw.get("keep_columns") or ()),
    )
    return JobConfig(**raw)


def _tiling(raw: dict[str, Any], models: tuple[str, ...]) -> TilingConfig:
    """TilingConfig from ``raw``; ``tile_px``/``target_mpp`` default to the first known
    model's native tile (``EncoderSpec.tile_px``) and native µm/px. Logs a warning when the
    models expect different native tiles (one tiling serves them all)."""
    raw = dict(raw)
    if isinstance(raw.get("tissue"), dict):
        raw["tissue"] = TissueConfig(**raw["tissue"])
    for name in models:
        try:
            spec = get_spec(name)
        except UnknownModelError:
            continue
        raw.setdefault("tile_px", spec.tile_px)
        raw.setdefault("target_mpp", spec.native_mpp)
        break
    tiling = TilingConfig(**raw)
    mismatch = native_tile_mismatch(models, tiling.tile_px, tiling.target_mpp)
    if mismatch:
        logging.getLogger(__name__).warning(mismatch)
    return tiling


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML job file (local or s3://) into a dict."""
    from pathray.fs import split_uri

    fs, p = split_uri(path)
    with fs.open(p, "rb") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job config must be a YAML mapping")
    return data
