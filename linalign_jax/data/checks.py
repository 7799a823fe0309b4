"""Checks of a run's inputs that need no model, done once before any model is loaded.

A bad value found after minutes of extraction (or, worse, never: a one-class task scores 100% everywhere) costs a
user hours, so every binary validates its data and settings here first. Each error names the input, the value and
the fix; binaries print it as one `error:` line.

    check_limits(test_limit=-5)                     row limits are >= 0 (0 = all)
    check_task(spec, train_labels, test_labels, …)  ≥ 2 classes, a test split, shots that fit the train split
    check_knn(k, n, …)                              mutual kNN's 1 <= k < N
    check_rows(spec, n, minimum, …)                 enough rows for a measure / a split
(`io_utils.check_outside` checks that no input lives in an output folder a run will replace.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from linalign_jax.errors import LinalignError


def check_limits(**limits: int) -> None:
    """Each `--name=value` is an int >= 0; 0 means all rows."""
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise LinalignError(f"--{name}={value!r}: a row limit must be >= 0 (0 = all rows)")


def check_rows(spec: str, n: int, minimum: int, what: str, fix: str) -> None:
    if n < minimum:
        raise LinalignError(f"{spec}: {what} needs at least {minimum} rows, got {n}; {fix}")


def check_task(spec: str, train_labels: Sequence[int], test_labels: Sequence[int], class_names: Sequence[str], *,
               shots: Sequence[int] = (), per_class_shots: bool = False, label_column: str = "label") -> None:
    """A classification task a head can learn and be scored on, with every requested shot count drawable.

    Shots follow `evaluate.settings.sample_shots`: k rows in total (1 <= k < train rows, stratified) or k rows of
    every class (k <= the smallest class).
    """
    train, test = np.asarray(train_labels), np.asarray(test_labels)
    present = [class_names[c] for c in np.unique(train)]
    if len(present) < 2:
        raise LinalignError(
            f"{spec}: the train split has {len(present)} class ({', '.join(map(repr, present)) or 'none'}) in "
            f"{len(train)} rows; a classifier needs at least 2 (is --label_column={label_column} the label column?)")
    check_rows(spec, len(test), 1, "evaluation", "raise --test_limit or give the dataset a test split")
    counts = np.bincount(train, minlength=len(class_names))
    smallest = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
    for k in shots:
        if per_class_shots and not 1 <= k <= counts[smallest]:
            raise LinalignError(
                f"{spec}: {k} shots per class requested, but the train split has only {counts[smallest]} rows of "
                f"class {class_names[smallest]!r} (per-class counts {dict(zip(class_names, counts.tolist()))}); "
                f"lower --shots to <= {counts[smallest]} or raise --train_limit")
        if not per_class_shots and not 1 <= k < len(train):
            raise LinalignError(f"{spec}: {k} shots requested, but the train split has {len(train)} rows; lower "
                                f"--shots below {len(train)} or raise --train_limit")


def check_knn(k: int, n: int, where: str, fix: str) -> None:
    """Mutual kNN looks for k neighbours among the other N − 1 rows."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n:
        raise LinalignError(f"mutual kNN needs 1 <= k < N: --knn_k={k!r} with N={n} {where}; {fix}")
