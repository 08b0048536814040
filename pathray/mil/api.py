"""The slide-level model API: ``train`` (cross-validated), ``evaluate`` and ``predict``
(saved or in-memory fold models), ``attention`` (per-tile weights for heatmaps)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pathray.mil.bags import BagIndex, check_finite, index_bags
from pathray.mil.classifier import SlideClassifier, attention_table, predict_probs
from pathray.mil.labels import Labels, SlideLabels, read_joined
from pathray.mil.splits import Splits, check_splits, make_splits
from pathray.mil.train import (
    METRICS,
    FoldResult,
    TrainConfig,
    fit,
    fold_summary,
    predictions_table,
    run_fold,
    run_record,
    torch_threads,
)
from pathray.store import FeatureStore

RUN_RECORD = "run.json"
SPLITS_FILE = "splits.json"
PREDICTIONS_FILE = "predictions.parquet"
#: labels: a table or its .csv/.parquet path (``label`` column, default key), or :class:`Labels`
LabelSource = str | Path | pa.Table | Labels


@dataclass
class MilResult:
    """A cross-validated run: per-fold results, their mean ± std, out-of-fold predictions,
    the splits, the fold classifiers (in memory) and the run record (also ``out/run.json``)."""

    folds: list[FoldResult]
    metrics: dict[str, dict[str, float]]
    predictions: pa.Table
    splits: Splits
    classifiers: list[SlideClassifier]
    record: dict[str, Any]
    out: str | None

    def summary(self) -> str:
        lines = [
            f"fold {f.fold}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in f.metrics.items())
            + f" (train {f.n_train}, val {f.n_val}, test {f.n_test}; best epoch {f.best_epoch})"
            for f in self.folds
        ]
        lines += [f"{name}: {m['mean']:.3f} ± {m['std']:.3f} over {m['n']} folds" for name, m in self.metrics.items()]
        return "\n".join(lines)


def train(
    store: FeatureStore | str,
    model: str,
    labels: LabelSource,
    *,
    out: str | Path | None = None,
    config: TrainConfig | None = None,
    splits: str | Path | Splits | None = None,
) -> MilResult:
    """Cross-validate ABMIL on the committed slides of ``model`` labelled by ``labels`` (a
    table or its path with a ``label`` column, or :class:`~pathray.mil.labels.Labels` naming
    the label column and join key: see :func:`pathray.mil.labels.join_labels`). ``splits``: a
    saved ``splits.json`` (or :class:`Splits`) to reuse instead of making new ones; it must
    test every labelled slide once and never split a patient. ``out``: where the run record,
    splits, fold checkpoints and predictions are written (nothing is written when ``None``)."""
    config = config or TrainConfig()
    index = index_bags(store, model)
    joined = read_joined(index, Labels.of(labels))
    check_finite(index, sorted(joined.labels))
    if splits is None:
        splits = make_splits(joined.labels, joined.patients, config.n_folds, config.val_fraction, config.seed)
    elif not isinstance(splits, Splits):
        splits = Splits.load(splits)
    check_splits(splits, joined.labels, joined.patients)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        splits.save(out_dir / SPLITS_FILE)
    folds, classifiers, rows = _run_folds(index, joined, splits, config, out_dir)
    metrics = fold_summary(folds)
    record = run_record(
        index, joined, config, {"splits": asdict(splits), "folds": [asdict(f) for f in folds], "metrics": metrics}
    )
    predictions = predictions_table(joined.classes, rows)
    if out_dir is not None:
        (out_dir / RUN_RECORD).write_text(json.dumps(record, indent=2, default=str, allow_nan=False))
        pq.write_table(predictions, out_dir / PREDICTIONS_FILE)
    return MilResult(folds, metrics, predictions, splits, classifiers, record, str(out_dir) if out_dir else None)


def _run_folds(
    index: BagIndex, joined: SlideLabels, splits: Splits, config: TrainConfig, out_dir: Path | None
) -> tuple[list[FoldResult], list[SlideClassifier], list[tuple]]:
    """Train each fold; ``(fold results, fold classifiers, out-of-fold prediction rows)``."""
    folds, classifiers, rows = [], [], []
    for fold in splits.folds:
        with torch_threads(config.cpu_threads):
            result, classifier, probs = run_fold(index, joined, fold, config, out_dir)
        folds.append(result)
        classifiers.append(classifier)
        tested = [s for s in fold.test if s in joined.labels]
        rows += [(s, fold.fold, joined.labels[s], p) for s, p in zip(tested, probs)]
    return folds, classifiers, rows


Run = str | Path | MilResult | SlideClassifier


def load_classifiers(run: Run, device: str | None = None) -> list[SlideClassifier]:
    """The classifiers of ``run``: a run directory's fold checkpoints, an in-memory
    :class:`MilResult`'s fold models, or a single :class:`SlideClassifier`."""
    if isinstance(run, SlideClassifier):
        return [run]
    if isinstance(run, MilResult):
        return run.classifiers
    record = json.loads((Path(run) / RUN_RECORD).read_text())
    return [SlideClassifier.load(Path(run) / f["checkpoint"], device) for f in record["folds"]]


def predict(run: Run, store: FeatureStore | str, model: str, slide_ids: list[str] | None = None) -> pa.Table:
    """Class probabilities (mean over the run's fold models) for ``slide_ids`` (default:
    every committed slide of ``model``): slide_id, ``prob_<class>``…, ``predicted``."""
    classifiers = load_classifiers(run)
    index = index_bags(store, model)
    slide_ids = slide_ids or index.slides.column("slide_id").to_pylist()
    check_finite(index, slide_ids)
    probs = predict_probs(classifiers, index, slide_ids)
    classes = classifiers[0].classes
    columns = {
        "slide_id": slide_ids,
        **{f"prob_{c}": probs[:, i] for i, c in enumerate(classes)},
        "predicted": [str(classes[i]) for i in probs.argmax(axis=1)],
    }
    return pa.table(columns)


def evaluate(run: Run, store: FeatureStore | str, model: str, labels: LabelSource) -> dict[str, Any]:
    """Score the run's fold ensemble on labelled slides of ``store`` (e.g. an external
    cohort): ``{"n_slides", <metric>: value, "predictions": table}``. The labels (as for
    :func:`train`) must use the run's classes."""
    classifiers = load_classifiers(run)
    index = index_bags(store, model)
    joined = read_joined(index, Labels.of(labels))
    classes = classifiers[0].classes
    unknown = sorted(set(map(str, joined.classes)) - set(map(str, classes)))
    if unknown:
        raise ValueError(f"labels {unknown} are not classes of the run ({classes})")
    slide_ids = sorted(joined.labels)
    check_finite(index, slide_ids)
    position = {str(c): i for i, c in enumerate(classes)}
    y = np.array([position[str(joined.classes[joined.labels[s]])] for s in slide_ids])
    probs = predict_probs(classifiers, index, slide_ids)
    result: dict[str, Any] = {"n_slides": len(slide_ids), **{n: fn(y, probs) for n, fn in METRICS.items()}}
    result["predictions"] = predictions_table(classes, [(s, -1, int(c), p) for s, c, p in zip(slide_ids, y, probs)])
    return result


def attention(run: Run, store: FeatureStore | str | BagIndex, model: str, slide_id: str) -> pa.Table:
    """Per-tile attention of one slide (mean over the run's fold models): tile_index, x, y,
    size_level0 (level-0 px) and ``attention`` (sums to 1 over the slide)."""
    classifiers = load_classifiers(run)
    index = store if isinstance(store, BagIndex) else index_bags(store, model)
    return attention_table(classifiers, index, slide_id)


def fit_all(
    store: FeatureStore | str, model: str, labels: LabelSource, *, config: TrainConfig | None = None
) -> SlideClassifier:
    """One network fitted on every labelled slide for ``config.max_epochs`` epochs, with no
    held-out slides: nothing it returns measures how well it generalises (use :func:`train`)."""
    config = config or TrainConfig()
    index = index_bags(store, model)
    joined = read_joined(index, Labels.of(labels))
    check_finite(index, sorted(joined.labels))
    with torch_threads(config.cpu_threads):
        return fit(index, joined, sorted(joined.labels), [], config, seed=config.seed).classifier
