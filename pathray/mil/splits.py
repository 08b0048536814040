"""Patient-level stratified k-fold splits, saved as JSON and reusable.

Every slide of a patient lands in the same fold (and, inside a training fold, in the same
train/validation part), so no patient is ever both trained and tested on. Folds are
stratified on the patient's label (its slides' most common label): for each class in
turn, its patients (shuffled by the seed, then largest first) go to the fold holding the
fewest slides of that class so far. The same inputs and seed give the same splits.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Fold:
    """Slide ids of one outer fold: ``test`` held out; ``train`` fits, ``val`` early-stops."""

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]


@dataclass(frozen=True)
class Splits:
    """The outer folds of a run, with what they were made from."""

    seed: int
    n_folds: int
    val_fraction: float
    folds: list[Fold]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        raw = json.loads(Path(path).read_text())
        return cls(raw["seed"], raw["n_folds"], raw["val_fraction"], [Fold(**f) for f in raw["folds"]])

    def slide_ids(self) -> set[str]:
        return {s for f in self.folds for s in (*f.train, *f.val, *f.test)}


def assign_groups(labels: dict[str, int], patients: dict[str, str], n_parts: int, seed: int) -> dict[str, int]:
    """Part index (0..n_parts-1) of every slide, by patient, stratified on label."""
    slides_of: dict[str, list[str]] = {}
    for slide_id in sorted(labels):
        slides_of.setdefault(patients[slide_id], []).append(slide_id)
    label_of = {p: Counter(labels[s] for s in ss).most_common(1)[0][0] for p, ss in slides_of.items()}
    rng = np.random.default_rng(seed)
    counts = np.zeros((max(labels.values(), default=0) + 1, n_parts), dtype=np.int64)
    part_of: dict[str, int] = {}
    for c in sorted(set(label_of.values())):
        group = [p for p in sorted(label_of) if label_of[p] == c]
        group = [group[i] for i in rng.permutation(len(group))]
        group.sort(key=lambda p: -len(slides_of[p]))  # stable: shuffled order among equal sizes
        for patient in group:
            part = min(range(n_parts), key=lambda k: (counts[c, k], counts[:, k].sum(), k))
            counts[c, part] += len(slides_of[patient])
            part_of[patient] = part
    return {s: part_of[patients[s]] for s in labels}


def make_splits(
    labels: dict[str, int], patients: dict[str, str], n_folds: int = 5, val_fraction: float = 0.2, seed: int = 0
) -> Splits:
    """Outer ``n_folds`` folds over ``labels`` (slide id -> class index) grouped by
    ``patients`` (slide id -> patient id); inside each fold's training slides, about
    ``val_fraction`` of the patients go to ``val`` (same grouping and stratification)."""
    n_patients = len({patients[s] for s in labels})
    if n_folds < 2 or n_folds > n_patients:
        raise ValueError(f"n_folds must be in [2, {n_patients}] (the number of patients), got {n_folds}")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    outer = assign_groups(labels, patients, n_folds, seed)
    folds = []
    for k in range(n_folds):
        rest = {s: c for s, c in labels.items() if outer[s] != k}
        inner = assign_groups(rest, patients, max(2, round(1 / val_fraction)), seed + 1 + k)
        folds.append(
            Fold(
                k,
                sorted(s for s in rest if inner[s] != 0),
                sorted(s for s in rest if inner[s] == 0),
                sorted(s for s in labels if outer[s] == k),
            )
        )
    return Splits(seed, n_folds, val_fraction, folds)


def check_splits(splits: Splits, labels: dict[str, int], patients: dict[str, str]) -> None:
    """Raise ``ValueError`` if a labelled slide is in no fold's test part, is tested twice,
    or if a patient appears in two parts (train/val/test) of a fold."""
    tested = [s for f in splits.folds for s in f.test]
    missing = sorted(set(labels) - set(tested))
    if missing or len(tested) != len(set(tested)):
        raise ValueError(
            f"splits must test every labelled slide exactly once; missing {missing[:5]} "
            f"({len(missing)}), tested twice: {len(tested) - len(set(tested))}"
        )
    for f in splits.folds:
        parts = [{patients[s] for s in part if s in patients} for part in (f.train, f.val, f.test)]
        leaked = (parts[0] & parts[1]) | (parts[0] & parts[2]) | (parts[1] & parts[2])
        if leaked:
            raise ValueError(f"fold {f.fold}: patients in two parts: {sorted(leaked)[:5]}")
