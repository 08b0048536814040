"""Typed configuration of one embedding job, loadable from YAML with CLI overrides.

A YAML job file uses the field names below, e.g.::

    manifest: s3://bucket/manifests/tcga-brca.csv
    out: s3://bucket/stores/brca
    models: [uni2-h, virchow2]
    tiling: {tile_px: 224, target_mpp: 0.5, min_tissue_fraction: 0.25}
    encoders:
      uni2-h: {dtype: bf16, batch_size: 256}
      virchow2: {dtype: fp16}
    weights: {virchow2: s3://bucket/weights/virchow2}   # or $PATHRAY_WEIGHTS_DIR/<model>/
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
from pathray.encoders.offline import weights_dir_source
from pathray.encoders.registry import native_tile_mismatch
from pathray.errors import UnknownModelError
from pathray.tiling.grid import TilingConfig, TilingGroup
from pathray.tiling.tissue import TissueConfig
from pathray.wsi.scratch import DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class ResourceConfig:
    """How the job claims cluster resources. ``None`` fields are derived from the cluster
    (see :func:`pathray.job.resources.plan_resources`)."""

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
    committers: int | None = None  # commit actors (default: one per 16 cluster CPUs, see pathray.job.committers)
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
    #: models embedded at a tiling other than ``tiling``: their own native tile (see :func:`build_job_config`)
    model_tilings: dict[str, TilingConfig] = field(default_factory=dict)
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
    #: (pathray.job.localrun); "auto": local only with no Ray cluster to join and no GPU here
    runner: str = "auto"
    run_id: str | None = None  # default: UTC timestamp + random suffix

    def public_dict(self) -> dict[str, Any]:
        """JSON-able view for the run record (storage options left out: they may hold secrets)."""
        d = dataclasses.asdict(self)
        d.pop("storage_options")
        d.pop("slide_storage_options")
        return d

    def tiling_of(self, model: str) -> TilingConfig:
        """The tiling ``model``'s tiles are cut at."""
        return self.model_tilings.get(model, self.tiling)

    def tiling_groups(self, models: list[str] | tuple[str, ...] | None = None) -> tuple[TilingGroup, ...]:
        """One :class:`TilingGroup` per distinct tiling of ``models`` (default: the run's), in
        model order; a single group for every model when they share one tiling."""
        models = tuple(self.models if models is None else models)
        by_fp: dict[str, list[str]] = {}
        tilings: dict[str, TilingConfig] = {}
        for m in models:
            tiling = self.tiling_of(m)
            by_fp.setdefault(tiling.fingerprint(), []).append(m)
            tilings[tiling.fingerprint()] = tiling
        if len(by_fp) <= 1:
            return (TilingGroup(next(iter(tilings.values()), self.tiling)),)
        return tuple(TilingGroup(tilings[fp], tuple(ms)) for fp, ms in by_fp.items())

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


def model_tiling_records(config: JobConfig, models: list[str]) -> dict[str, dict[str, Any]]:
    """Store records of the tilings of ``models`` that are cut at their own native tile
    (not ``config.tiling``): what :meth:`pathray.store.FeatureStore.check_config` takes."""
    return {m: tiling_record(config.model_tilings[m]) for m in models if m in config.model_tilings}


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
    known = {f.name for f in dataclasses.fields(JobConfig)} | {"weights"}
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
    encoders = _encoder_configs(models, raw.get("encoders") or {}, raw.pop("weights", None) or {})
    tiling, model_tilings = _tilings(raw.get("tiling") or {}, models)
    raw.update(
        models=models,
        encoders=encoders,
        tiling=tiling,
        model_tilings=model_tilings,
        resources=ResourceConfig(**(raw.get("resources") or {})),
        keep_columns=tuple(raw.get("keep_columns") or ()),
    )
    return JobConfig(**raw)


def _encoder_configs(
    models: tuple[str, ...], encoder_raw: dict[str, Any], weights_map: dict[str, str]
) -> dict[str, EncoderConfig]:
    """Each model's :class:`EncoderConfig`. Its weights come from, in order: ``encoders.<m>.weights``,
    the YAML ``weights: {model: source}`` map, ``$PATHRAY_WEIGHTS_DIR/<m>`` when that folder
    exists (resolved here, on the driver), else the spec's hub repo."""
    if not isinstance(weights_map, dict):
        raise ValueError("weights: expected a mapping {model: source}")
    unknown = sorted(set(weights_map) - set(models))
    if unknown:
        raise ValueError(f"weights: {unknown} not among the run's models {list(models)}")
    configs = {}
    for m in models:
        fields = {k: v for k, v in (encoder_raw.get(m) or {}).items() if k != "model"}
        if not fields.get("weights"):
            source = weights_map.get(m) or weights_dir_source(m)
            if source:
                fields["weights"] = source
        configs[m] = EncoderConfig(model=m, **fields)
    return configs


def _tilings(raw: dict[str, Any], models: tuple[str, ...]) -> tuple[TilingConfig, dict[str, TilingConfig]]:
    """``(tiling, model_tilings)`` from the YAML/CLI ``tiling`` mapping.

    With ``tile_px`` or ``target_mpp`` given, every model is cut at that one tiling (a warning
    names models that see a field of view other than their card's). Otherwise each known
    model gets its native tile (``EncoderSpec.tile_px`` px at ``native_mpp``): ``tiling`` is
    the first model's, and ``model_tilings`` holds each model whose native tile differs, with
    the same tissue settings and no overlap. Unknown names fall back to ``tiling``."""
    raw = dict(raw)
    if isinstance(raw.get("tissue"), dict):
        raw["tissue"] = TissueConfig(**raw["tissue"])
    pinned = "tile_px" in raw or "target_mpp" in raw
    natives = {}
    for name in models:
        try:
            spec = get_spec(name)
        except UnknownModelError:
            continue
        natives[name] = (spec.tile_px, spec.native_mpp)
    if natives:
        first = next(iter(natives.values()))
        raw.setdefault("tile_px", first[0])
        raw.setdefault("target_mpp", first[1])
    tiling = TilingConfig(**raw)
    if pinned:
        mismatch = native_tile_mismatch(models, tiling.tile_px, tiling.target_mpp)
        if mismatch:
            logging.getLogger(__name__).warning(mismatch)
        return tiling, {}
    own = {
        m: dataclasses.replace(tiling, tile_px=px, target_mpp=mpp, stride_px=None)
        for m, (px, mpp) in natives.items()
        if (px, mpp) != (tiling.tile_px, tiling.target_mpp)
    }
    return tiling, own


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML job file (local or s3://) into a dict."""
    from pathray.fs import split_uri

    fs, p = split_uri(path)
    with fs.open(p, "rb") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job config must be a YAML mapping")
    return data
