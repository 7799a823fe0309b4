"""Bulk (feature-major) HELIX: one ciphertext per input feature across up to `slots` queries, no rotation keys.

Feature j of n queries sits in ciphertext j (slot q = query q); output j is Σ_i A[i, j] · ct_i, one `EvalLinearWSum`
with scalar weights, so the provider needs no rotation keys and returns d_out ciphertexts, each rescaled to two
towers and sanitized (`sanitize.py`) down to one. Scaling follows `linear.py`: the scaled column 1-norms bound every
slot; the bias goes into the n used slots, the message flood into the others (there the value would be the output for
a zero query, up to encoding rounding) and into every imaginary part.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
import openfhe as fhe

from linalign_jax.errors import LinalignError
from linalign_jax.helix.linear import VALUE_BUDGET_FRACTION, check_weights, scaled_bias, weight_scale
from linalign_jax.helix.presets import get_preset
from linalign_jax.helix.sanitize import sanitize


@dataclasses.dataclass(frozen=True)
class BulkLayout:
    """Public shape of a bulk layer: d_in feature ciphertexts in, d_out output ciphertexts back."""

    d_in: int
    d_out: int
    preset: str = "san48_55"
    kind: str = "bulk"

    def __post_init__(self):
        if not (isinstance(self.d_in, (int, np.integer)) and isinstance(self.d_out, (int, np.integer))
                and self.d_in >= 1 and self.d_out >= 1):
            raise LinalignError(f"layer shape must be positive integers, got d_in={self.d_in!r}, d_out={self.d_out!r}")
        get_preset(self.preset)

    @property
    def slots(self) -> int:
        return get_preset(self.preset).slots

    def rotation_indices(self) -> tuple[int, ...]:
        return ()

    def output_mask(self, n: int) -> np.ndarray:
        """True at the slots the client reads in every output ciphertext (one per query); the rest is flood."""
        return np.arange(self.slots) < n

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class BulkPlan:
    """Scaled weights of y = x A + a for feature-major evaluation (nothing to encode ahead: weights are scalars)."""

    def __init__(self, layout: BulkLayout, A: np.ndarray, a: np.ndarray | None = None):
        A, a = check_weights(A, a, layout.d_in, layout.d_out)
        self.layout, self.preset = layout, get_preset(layout.preset)
        self.value_budget = self.preset.headroom * VALUE_BUDGET_FRACTION
        self.scale = weight_scale(np.abs(A).sum(axis=0), self.value_budget)
        self._columns = [[float(w) for w in column] for column in (A / self.scale).T]
        self._bias = a

    @classmethod
    def build(cls, layout: BulkLayout, A: np.ndarray, a: np.ndarray | None = None) -> "BulkPlan":
        return cls(layout, A, a)

    def apply(self, cc: fhe.CryptoContext, public_key: fhe.PublicKey,
              feature_chunks: Iterable[Sequence[fhe.Ciphertext]], input_bound: float,
              n: int) -> tuple[list[fhe.Ciphertext], float]:
        """d_out sanitized one-tower result ciphertexts for n queries, and the output scale.

        Features arrive in consecutive chunks (feature order), so the provider holds one chunk of inputs at a time
        (d_in = 4096 ciphertexts would be ~1 GB).
        """
        if not 1 <= n <= self.preset.slots:
            raise LinalignError(f"bulk batch of {n} queries; expected 1..{self.preset.slots}")
        bias = scaled_bias(self._bias, self.scale, input_bound, self.value_budget)
        sums: list[fhe.Ciphertext | None] = [None] * self.layout.d_out
        start = 0
        for chunk in feature_chunks:
            chunk = list(chunk)
            for j, column in enumerate(self._columns):
                part = cc.EvalLinearWSum(chunk, column[start:start + len(chunk)])
                sums[j] = part if sums[j] is None else cc.EvalAdd(sums[j], part)
            start += len(chunk)
        if start != self.layout.d_in:
            raise LinalignError(f"bulk input holds {start} features, expected d_in={self.layout.d_in}")
        read = self.layout.output_mask(n)
        results = [sanitize(cc, public_key, _at_degree_2(cc, total), self.preset, np.where(read, bias[j], 0.0), read)
                   for j, total in enumerate(sums)]
        return results, self.scale * input_bound


def _at_degree_2(cc: fhe.CryptoContext, ct: fhe.Ciphertext) -> fhe.Ciphertext:
    """EvalLinearWSum rescales by itself under FIXEDMANUAL when it multiplies; rescale only what it left at degree 3."""
    return cc.Rescale(ct) if ct.GetNoiseScaleDeg() == 3 else ct
