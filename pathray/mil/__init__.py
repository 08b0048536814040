"""Slide-level models on the feature store: gated-attention MIL (ABMIL), trained with
patient-level cross-validation from streamed bags, and its per-tile attention.

>>> result = train("demo-out/store", "kaiko-vits16", "labels.csv", out="runs/abmil")  # doctest: +SKIP
>>> print(result.summary())                                                             # doctest: +SKIP
>>> attention("runs/abmil", "demo-out/store", "kaiko-vits16", "slide-1")                # doctest: +SKIP
"""

from pathray.mil.api import MilResult, attention, evaluate, fit_all, load_classifiers, predict, train
from pathray.mil.classifier import SlideClassifier
from pathray.mil.labels import Labels
from pathray.mil.splits import Splits, make_splits
from pathray.mil.train import TrainConfig

__all__ = [
    "Labels",
    "MilResult",
    "SlideClassifier",
    "Splits",
    "TrainConfig",
    "attention",
    "evaluate",
    "fit_all",
    "load_classifiers",
    "make_splits",
    "predict",
    "train",
]
