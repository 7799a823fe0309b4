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


def input_bound(values: np.ndarray) -> float:
    """The public bound a client declares for its inputs: the next power of two of the largest |entry| (a power of
    two keeps the CKKS scale exact and says little about the data; floored at 1e-12, so an all-zero batch gives a
    finite bound, not 2^-inf)."""
    return float(2.0 ** np.ceil(np.log2(max(float(np.abs(values).max()), 1e-12))))
