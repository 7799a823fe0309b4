"""Deterministic stratified train/test splits.

Each class contributes its proportional share of the test set, rounded by the largest-remainder rule so the total is
exactly `test_size` and every class is within one example of proportional. One seeded numpy Generator drives every
random choice, so (labels, test_size, seed) fully determines the split on any machine and numpy version >= 1.17.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

from linalign_jax.errors import LinalignError


def count_test_examples(n: int, test_size: Union[int, float]) -> int:
    """Number of test examples: an int is a count, a float in (0, 1) a fraction of `n`."""
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float, np.integer, np.floating)):
        raise LinalignError(f"test_size must be an int count or a float fraction, got {test_size!r}")
    if isinstance(test_size, (float, np.floating)):
        if not 0.0 < test_size < 1.0:
            raise LinalignError(f"fractional test_size must be in (0, 1), got {test_size}")
        count = int(round(n * float(test_size)))
    else:
        count = int(test_size)
    if not 1 <= count <= n - 1:
        raise LinalignError(f"test_size {test_size!r} gives {count} test examples out of {n}; need 1..{n - 1}")
    return count


def stratified_split(labels: Sequence[int], test_size: Union[int, float], seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), each in a seeded random order."""
    labels = np.asarray(labels)
    n = len(labels)
    n_test = count_test_examples(n, test_size)
    classes, counts = np.unique(labels, return_counts=True)
    ideal = n_test * counts / n
    quota = np.floor(ideal).astype(int)
    shortfall = n_test - int(quota.sum())
    # Largest remainders first; ties go to the earlier class (stable sort), which keeps the split deterministic.
    quota[np.argsort(-(ideal - quota), kind="stable")[:shortfall]] += 1

    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls, k in zip(classes, quota):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[:k])
        train.append(members[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def stratified_subsample(labels: Sequence[int], limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified subsample of `limit` rows (all rows when limit is 0 or ≥ N)."""
    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    return np.sort(stratified_split(labels, limit, seed)[1])
