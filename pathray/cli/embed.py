"""`pathray embed`: run the Ray Data job (also the body of ``jobs/embed.py``).

Options override the YAML file given with ``--config``. Exit status: 0 when every slide
ended ok or without tissue, 1 when any slide/model error was recorded (see the store's
``errors/`` and ``slides.parquet``), 2 when the job could not start (bad manifest,
config mismatch with the store, no usable model, unreachable storage) or stopped part-way
(storage unreachable, lease lost; a re-run resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pathray.cli.s3 import add_s3_options, apply_s3_args
from pathray.errors import PathrayError

SAMPLE_QUERY = """\
import pyarrow.dataset as ds
# one dataset per model (models differ in embedding width); committed slides only:
# pathray.store.FeatureStore("{root}").dataset("{model}")
tiles = ds.dataset("{root}/features/model={model}", partitioning="hive").to_table()
print(tiles.group_by(["cohort", "slide_id"]).aggregate([("tile_index", "count")]))"""


def configure(parser: argparse.ArgumentParser) -> None:
    """The options of `pathray embed`: what to embed and how to tile it, then the models, then the run."""
    add = parser.add_argument
    add("--config", help="YAML job file (pathray.job.config); options below override it")
    add("--manifest", help="slide manifest: CSV/TSV/Parquet/JSONL, local or s3://")
    add("--models", help="comma-separated model names (see `pathray models`)")
    add("--out", help="feature store root: local dir or s3://bucket/prefix")
    add(
        "--tile-px", type=int, help="tile side in pixels (default: the first model's native tile, see `pathray models`)"
    )
    add("--target-mpp", type=float, help="tile resolution in µm/px (default: the first model's native µm/px)")
    add("--stride-px", type=int, help="grid stride in target pixels (default: tile px, no overlap)")
    add("--min-tissue", type=float, dest="min_tissue_fraction", help="drop tiles with less tissue than this fraction")
    add("--chunk-tiles", type=int, help="tiles per work unit (default 256)")
    _add_model_options(parser)
    _add_run_options(parser)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """Per-model options (weights, precision, batch) and the encoder pools' sizes."""
    add = parser.add_argument
    add(
        "--weights",
        action="append",
        default=[],
        metavar="MODEL=SOURCE",
        help="weights for a model: local or s3:// hub-layout dir, .safetensors/.pth file, or hf-hub:org/name "
        "(repeatable); default: $PATHRAY_WEIGHTS_DIR/MODEL if present, else the hub",
    )
    add("--dtype", choices=["fp32", "bf16", "fp16"], help="compute precision for every model")
    add("--output-dtype", choices=["float32", "float16"], help="stored embedding precision for every model")
    add("--batch-size", type=int, help="encoder micro-batch for every model")
    add("--readers", type=int, help="max reader actors")
    add("--encoder-actors", type=int, help="encoder actors per model")
    add("--num-gpus", type=float, dest="encoder_num_gpus", help="GPUs per encoder actor (fractional allowed)")
    add("--keep-columns", help="comma-separated manifest columns to copy onto every tile row")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Where and how the run goes: storage, store versions, Ray, runner, output."""
    add = parser.add_argument
    add_s3_options(parser)
    add(
        "--new-version", action="store_true", help="on a config mismatch, write a new store version under OUT/versions/"
    )
    add("--ray-address", help="Ray cluster address (default: the job's cluster, or a local one)")
    add(
        "--runner",
        choices=["auto", "ray", "local"],
        help="ray: the Ray Data plan; local: the same stages in this process, no Ray; auto (default): local only "
        "when there is no Ray cluster to join (no --ray-address / RAY_ADDRESS) and no GPU here",
    )
    add("--run-id", help="name of this run (default: timestamp)")
    add("--dry-run", action="store_true", help="print the plan (slides, estimated tiles, resources) and exit")
    add("--no-progress", action="store_true", help="no live progress display")
    add(
        "--verbose",
        action="store_true",
        help="show every log line and Ray's own progress and logs on the terminal "
        "(otherwise they go to the run's log, _runs/RUN_ID/run.log in the store)",
    )


def raw_config(args: argparse.Namespace) -> dict:
    """Merge ``--config`` YAML with the command-line options into a plain dict."""
    from pathray.job.config import load_yaml

    raw = load_yaml(args.config) if args.config else {}
    for key in ("manifest", "models", "out", "chunk_tiles", "new_version", "ray_address", "runner", "run_id"):
        value = getattr(args, key)
        if value not in (None, False):
            raw[key] = value
    raw["tiling"] = _given(args, raw.get("tiling"), ("tile_px", "target_mpp", "stride_px", "min_tissue_fraction"))
    raw["resources"] = _given(args, raw.get("resources"), ("readers", "encoder_actors", "encoder_num_gpus"))
    if args.keep_columns:
        raw["keep_columns"] = [c.strip() for c in args.keep_columns.split(",") if c.strip()]
    apply_s3_args(args, raw)
    models = raw.get("models") or []
    raw["models"] = [m.strip() for m in (models.split(",") if isinstance(models, str) else models)]
    raw["encoders"] = _encoders(args, raw["models"], raw.get("encoders") or {})
    return raw


def _given(args: argparse.Namespace, section: dict | None, keys: tuple[str, ...]) -> dict:
    """A copy of a YAML section (``None``: empty) with the options of ``keys`` that were given."""
    merged = dict(section or {})
    merged.update({key: getattr(args, key) for key in keys if getattr(args, key) is not None})
    return merged


def _encoders(args: argparse.Namespace, models: list[str], encoders: dict) -> dict[str, dict]:
    """Per model, its YAML ``encoders`` section with ``--weights MODEL=SOURCE`` and the options
    given for every model (``--dtype``, ``--output-dtype``, ``--batch-size``) applied."""
    merged = {m: dict(encoders.get(m) or {}) for m in models}
    for item in args.weights:
        model, _, source = item.partition("=")
        if model not in merged or not source:
            raise ValueError(f"--weights {item!r}: expected MODEL=SOURCE with MODEL among --models")
        merged[model]["weights"] = source
    for cfg in merged.values():
        cfg.update(_given(args, None, ("dtype", "output_dtype", "batch_size")))
    return merged


def run(args: argparse.Namespace) -> int:
    from pathray.job.config import build_job_config
    from pathray.job.estimate import dry_run_plan
    from pathray.job.raydata import run_job
    from pathray.job.runtime import new_run_id
    from pathray.monitor.runlog import LOG_FORMAT, run_footer, run_terminal

    try:
        raw = raw_config(args)
        if args.dry_run:
            logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
            print(json.dumps(dry_run_plan(build_job_config(raw)), indent=2, default=str))
            return 0
        config = build_job_config({**raw, "run_id": raw.get("run_id") or new_run_id()})
        with run_terminal(config.out, config.run_id, args.verbose) as terminal:
            report = run_job(
                config,
                progress_bars=args.verbose and not args.no_progress,
                display=None if args.no_progress else terminal.stream,
            )
            log_uri = terminal.finish(report.store, config.run_id, config.storage_options)
    except (PathrayError, ValueError) as exc:
        print(f"pathray embed: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"\nStore: {report.store}\nQuery it:\n" + SAMPLE_QUERY.format(root=report.store, model=config.models[0]))
    print(run_footer(log_uri, report.store, report.run_id, report.html))
    return report.exit_code
