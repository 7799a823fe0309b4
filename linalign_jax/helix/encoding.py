"""Plain-side value handling of HELIX: decoding plaintexts, bound checks."""
from __future__ import annotations

import numpy as np
import openfhe as fhe

from linalign_jax.errors import LinalignError


def decode(plaintext: fhe.Plaintext, length: int) -> np.ndarray:
    plaintext.SetLength(length)
    return np.asarray(plaintext.GetRealPackedValue(), dtype=np.float64)


def check_finite_bounded(values: np.ndarray, bound: float, what: str) -> np.ndarray:
    """float64 copy of `values`, or LinalignError naming the first non-finite or out-of-range entry."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise LinalignError(f"{what}: non-finite value {values[idx]} at index {idx}")
    if values.size and np.abs(values).max() > bound:
        idx = tuple(int(i) for i in np.unravel_index(np.abs(values).argmax(), values.shape))
        raise LinalignError(f"{what}: |value| {abs(values[idx]):.6g} at index {idx} exceeds the bound {bound:.6g}")
    return values
