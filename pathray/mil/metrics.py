"""Slide-level classification metrics, written out so their contracts are explicit.

* :func:`balanced_accuracy`: mean over the classes present in ``y_true`` of the recall
  of that class (argmax predictions).
* :func:`auroc`: area under the ROC curve as the Mann-Whitney U statistic (ties count
  one half). Two classes: the score is ``P(class 1)``. More classes: the macro average of
  one-vs-rest AUROCs over the classes that have both positives and negatives in
  ``y_true``. ``nan`` where no class qualifies (e.g. a single-class test fold).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """``y_true``: (N,) class indices; ``probs``: (N, C) class probabilities."""
    y_true = np.asarray(y_true)
    pred = np.asarray(probs).argmax(axis=1)
    recalls = [float(np.mean(pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """AUROC of ``score`` for the boolean ``positive``; ``nan`` without both kinds."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))  # average ranks: ties count one half
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC on ``probs[:, 1]`` for two classes, macro one-vs-rest for more."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    if probs.shape[1] == 2:
        return binary_auroc(y_true == 1, probs[:, 1])
    per_class = [binary_auroc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    valid = [a for a in per_class if not np.isnan(a)]
    return float(np.mean(valid)) if valid else float("nan")


def summarize(values: list[float]) -> dict[str, float]:
    """``mean`` and ``std`` (population, ddof=0) over the non-nan values; ``n`` counted."""
    arr = np.asarray([v for v in values if not np.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}
