"""``pathray mil train|eval|heatmap``: slide-level ABMIL on a feature store.

* ``train``: cross-validate on ``--labels`` (CSV/Parquet keyed by ``slide_id`` or a kept
  column such as ``case_id``); writes ``run.json``, ``splits.json``, ``fold-<k>.pt`` and
  ``predictions.parquet`` under ``--out`` and prints per-fold metrics and mean ± std.
* ``eval``: apply a run's fold ensemble to a store's slides; with ``--labels``, score it.
* ``heatmap``: a slide's ABMIL attention (``--run``) or any per-tile column (``--column``)
  over its thumbnail (PNG) and as QuPath GeoJSON.

Exit status 0 on success, 2 on unusable inputs (no such model, labels that match nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pathray.cli.s3 import add_s3_options, s3_options_from_args
from pathray.mil.labels import Labels
from pathray.mil.train import TrainConfig

#: command-line flag -> TrainConfig field
TRAIN_FLAGS = {
    "folds": "n_folds",
    "val_fraction": "val_fraction",
    "epochs": "max_epochs",
    "patience": "patience",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "hidden_dim": "hidden_dim",
    "attention_dim": "attention_dim",
    "dropout": "dropout",
    "seed": "seed",
    "device": "device",
    "cpu_threads": "cpu_threads",
}
#: type of the flags whose default is None
OPTIONAL_TYPES = {"device": str, "cpu_threads": int}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="cross-validate ABMIL on store slides and a labels table")
    _store_args(train)
    _label_args(train, required=True)
    train.add_argument("--out", required=True, help="run directory (run.json, splits.json, fold-<k>.pt, ...)")
    train.add_argument("--splits", default=None, help="reuse a splits.json instead of making new folds")
    defaults = TrainConfig()
    for flag, name in TRAIN_FLAGS.items():
        default = getattr(defaults, name)
        kind = OPTIONAL_TYPES.get(flag, type(default))
        train.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, default=default, type=kind, help=f"default {default}"
        )
    evaluate = sub.add_parser("eval", help="apply a trained run to store slides; score it with --labels")
    evaluate.add_argument("--run", required=True, help="run directory written by `pathray mil train`")
    _store_args(evaluate)
    _label_args(evaluate, required=False)
    evaluate.add_argument("--out", default=None, help="write the predictions here (.parquet)")
    heatmap = sub.add_parser("heatmap", help="per-tile attention or score over the slide thumbnail, and GeoJSON")
    _store_args(heatmap)
    heatmap.add_argument("--slide", required=True, help="slide_id")
    source = heatmap.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="ABMIL run directory: draw its attention")
    source.add_argument("--column", help="draw this per-tile column of the features file instead")
    heatmap.add_argument("--slide-path", default=None, help="the slide file (default: the path in its commit record)")
    heatmap.add_argument("--out", required=True, help="output prefix: writes PREFIX.png and PREFIX.geojson")
    add_s3_options(heatmap)


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="feature store root (local or s3://)")
    parser.add_argument("--model", default=None, help="model name (default: the store's only model)")


def _label_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--labels", required=required, help="CSV or Parquet labels table")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--key", default=None, help="join column: slide_id (default when present) or e.g. case_id")


def run(args: argparse.Namespace) -> int:
    try:
        return {"train": _train, "eval": _eval, "heatmap": _heatmap}[args.action](args)
    except ValueError as exc:
        print(f"pathray mil {args.action}: {exc}", file=sys.stderr)
        return 2


def _model(args: argparse.Namespace, storage_options: dict | None = None) -> str:
    from pathray.store import FeatureStore

    if args.model:
        return args.model
    models = FeatureStore(args.store, storage_options).models()
    if len(models) != 1:
        raise ValueError(f"pass --model: the store holds models {models}")
    return models[0]


def _train(args: argparse.Namespace) -> int:
    from pathray.mil import train

    config = TrainConfig(**{name: getattr(args, flag) for flag, name in TRAIN_FLAGS.items()})
    labels = Labels(args.labels, args.label_column, args.key)
    result = train(args.store, _model(args), labels, out=args.out, config=config, splits=args.splits)
    print(result.summary())
    print(f"run record: {Path(args.out) / 'run.json'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from pathray.mil import evaluate, predict

    model = args.model or json.loads((Path(args.run) / "run.json").read_text())["model"]
    if args.labels:
        scored = evaluate(args.run, args.store, model, Labels(args.labels, args.label_column, args.key))
        predictions = scored.pop("predictions")
        print(json.dumps(scored, indent=2))
    else:
        predictions = predict(args.run, args.store, model)
        print(predictions.to_pandas().to_string(index=False))
    if args.out:
        pq.write_table(predictions, args.out)
    return 0


def _heatmap(args: argparse.Namespace) -> int:
    from pathray.mil import attention
    from pathray.mil.heatmap import tile_scores, write_heatmap
    from pathray.store import FeatureStore
    from pathray.wsi.slide import open_slide

    store_options, slide_options = s3_options_from_args(args)
    store, model = FeatureStore(args.store, store_options), _model(args, store_options)
    record = store.commit_record(model, args.slide)
    if record is None:
        raise ValueError(f"slide {args.slide!r} is not committed for model {model!r}")
    column = args.column or "attention"
    if args.run:
        scores = attention(args.run, store, model, args.slide)
    else:
        scores = tile_scores(store, model, args.slide, column)
    with open_slide(
        args.slide_path or record.slide["path"], mpp_override=record.slide.get("mpp"), storage_options=slide_options
    ) as slide:
        write_heatmap(
            slide, scores, f"{args.out}.png", f"{args.out}.geojson", column=column, storage_options=store_options
        )
    print(f"wrote {args.out}.png and {args.out}.geojson ({len(scores)} tiles)")
    return 0
