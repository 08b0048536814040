"""Cross-validated ABMIL training and evaluation on a feature store.

:func:`train` joins a labels table onto the store's committed slides, makes (or reuses)
patient-level stratified folds, and for each fold fits a fresh network on its ``train``
slides, early-stops on its ``val`` slides (lowest validation loss, ``patience`` epochs) and
scores the held-out ``test`` slides. Bags are read one slide at a time in every epoch.
With ``out`` set, it writes ``run.json`` (the run record), ``splits.json``,
``fold-<k>.pt`` checkpoints and ``predictions.parquet`` (out-of-fold probabilities).

Deterministic for a seed on CPU: the network's initialisation, dropout and the order of
bags are seeded per fold. (On a GPU, cuBLAS may add last-bit differences.)
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pathray.mil.bags import BagIndex, load_bag
from pathray.mil.classifier import SlideClassifier, pick_device, predict_probs
from pathray.mil.labels import SlideLabels
from pathray.mil.metrics import auroc, balanced_accuracy, summarize
from pathray.mil.model import AbmilSpec, GatedAbmil
from pathray.mil.splits import Fold

METRICS = {"balanced_accuracy": balanced_accuracy, "auroc": auroc}


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. ``lr`` (Adam), ``weight_decay``; an epoch visits every training bag
    once in a seeded random order; ``class_weighted`` weights the loss by inverse class
    frequency of the training slides. ``cpu_threads=1`` is much faster for small bags on a
    busy machine (thread hand-offs cost more than the tiny matrix products)."""

    n_folds: int = 5
    val_fraction: float = 0.2
    max_epochs: int = 50
    patience: int = 10
    lr: float = 2e-4
    weight_decay: float = 1e-5
    hidden_dim: int = 128
    attention_dim: int = 64
    dropout: float = 0.25
    class_weighted: bool = True
    seed: int = 0
    device: str | None = None
    cpu_threads: int | None = None  # torch intra-op threads while fitting; None: torch's default

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.patience < 1 or self.n_folds < 2:
            raise ValueError("max_epochs and patience must be >= 1 and n_folds >= 2")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(frozen=True)
class FoldResult:
    """One outer fold: sizes, the epoch kept by early stopping, test metrics, and the
    per-epoch ``history`` (train_loss, val_loss)."""

    fold: int
    n_train: int
    n_val: int
    n_test: int
    best_epoch: int
    best_val_loss: float
    metrics: dict[str, float]
    checkpoint: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitOutcome:
    classifier: SlideClassifier
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    index: BagIndex, labels: SlideLabels, train_ids: list[str], val_ids: list[str], config: TrainConfig, seed: int
) -> FitOutcome:
    """Fit one network on ``train_ids``; keep the epoch with the lowest loss on ``val_ids``
    (stop after ``patience`` epochs without improvement). Without ``val_ids`` it trains
    ``max_epochs`` epochs and keeps the last."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = pick_device(config.device)
    spec = AbmilSpec(index.in_dim, len(labels.classes), config.hidden_dim, config.attention_dim, config.dropout)
    network = GatedAbmil(spec).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(labels, train_ids, config).to(device))
    best = FitOutcome(SlideClassifier(network, labels.classes), -1, float("inf"))
    best_state, since_best = None, 0
    for epoch in range(config.max_epochs):
        order = [train_ids[i] for i in rng.permutation(len(train_ids))]
        train_loss = _train_epoch(network, optimizer, loss_fn, index, labels, order)
        val_loss = _mean_loss(network, index, labels, val_ids) if val_ids else float("nan")
        if not np.isfinite(train_loss) or (val_ids and not np.isfinite(val_loss)):
            raise ValueError(
                f"fitting diverged at epoch {epoch}: train loss {train_loss}, validation loss {val_loss} "
                f"(try a lower --lr)"
            )
        best.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if not val_ids or val_loss < best.best_val_loss - 1e-6:
            best.best_epoch, best.best_val_loss, since_best = epoch, val_loss, 0
            best_state = copy.deepcopy(network.state_dict())
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    network.load_state_dict(best_state)
    network.eval()
    return best


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (``None``: unchanged), then restore."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _class_weights(labels: SlideLabels, train_ids: list[str], config: TrainConfig) -> torch.Tensor:
    counts = np.bincount([labels.labels[s] for s in train_ids], minlength=len(labels.classes)).astype(np.float64)
    if not config.class_weighted:
        return torch.ones(len(counts), dtype=torch.float32)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _train_epoch(network, optimizer, loss_fn, index: BagIndex, labels: SlideLabels, order: list[str]) -> float:
    network.train()
    device = next(network.parameters()).device
    total = 0.0
    for slide_id in order:
        bag = torch.from_numpy(load_bag(index, slide_id)).to(device)
        logits, _ = network(bag)
        loss = loss_fn(logits[None], torch.tensor([labels.labels[slide_id]], device=device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return total / max(1, len(order))


def _mean_loss(network, index: BagIndex, labels: SlideLabels, slide_ids: list[str]) -> float:
    probs = predict_probs([SlideClassifier(network, labels.classes)], index, slide_ids)
    y = np.array([labels.labels[s] for s in slide_ids])
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))


def run_fold(
    index: BagIndex, labels: SlideLabels, fold: Fold, config: TrainConfig, out: Path | None
) -> tuple[FoldResult, SlideClassifier, np.ndarray]:
    """Fit on ``fold.train``/``fold.val``, score ``fold.test``; returns the fold's result,
    its classifier and the test probabilities."""
    keep = labels.labels.keys()
    train_ids, val_ids, test_ids = ([s for s in part if s in keep] for part in (fold.train, fold.val, fold.test))
    outcome = fit(index, labels, train_ids, val_ids, config, seed=config.seed * 1000 + fold.fold)
    probs = predict_probs([outcome.classifier], index, test_ids)
    y = np.array([labels.labels[s] for s in test_ids])
    checkpoint = None
    if out is not None:
        checkpoint = f"fold-{fold.fold}.pt"
        outcome.classifier.save(out / checkpoint)
    metrics = {name: fn(y, probs) for name, fn in METRICS.items()}
    result = FoldResult(
        fold.fold,
        len(train_ids),
        len(val_ids),
        len(test_ids),
        outcome.best_epoch,
        outcome.best_val_loss,
        metrics,
        checkpoint,
        outcome.history,
    )
    return result, outcome.classifier, probs


def predictions_table(classes: list[Any], rows: list[tuple[str, int, int, np.ndarray]]) -> pa.Table:
    """Out-of-fold predictions: slide_id, fold, label (class name), then ``prob_<class>``."""
    columns = {
        "slide_id": [r[0] for r in rows],
        "fold": [r[1] for r in rows],
        "label": [str(classes[r[2]]) for r in rows],
    }
    for c, name in enumerate(classes):
        columns[f"prob_{name}"] = [float(r[3][c]) for r in rows]
    return pa.table(columns)


def run_record(index: BagIndex, labels: SlideLabels, config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """What a run was made from: store, fingerprint, model config, labels, hyper-parameters."""
    from pathray import __version__

    store_config = index.config
    return finite_json(
        {
            "pathray_version": __version__,
            "torch_version": torch.__version__,
            "created_at": time.time(),
            "store": index.store.root,
            "store_fingerprint": index.fingerprint(),
            "model": index.model,
            "model_config": store_config.models.get(index.model) if store_config else None,
            "tiling": (store_config.tiling_of(index.model) if store_config else None) or None,
            "in_dim": index.in_dim,
            "device": str(pick_device(config.device)),
            "hyperparameters": asdict(config),
            "labels": {
                "classes": labels.classes,
                "key": labels.key,
                "patient_key": labels.patient_key,
                "n_slides": len(labels.labels),
                "unmatched_label_rows": labels.unmatched,
            },
            **extra,
        }
    )


def finite_json(value: Any) -> Any:
    """``value`` with every NaN/infinite float (a fold without validation slides has no
    validation loss; a one-class test fold no AUROC) replaced by ``None``, so the JSON
    written is standard (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def fold_summary(folds: list[FoldResult]) -> dict[str, dict[str, float]]:
    """mean ± std over folds of each metric (nan folds left out, counted in ``n``)."""
    return {name: summarize([f.metrics[name] for f in folds]) for name in METRICS}
