"""Encrypted affine layers y = x A + a (A [d_in, d_out]) on one ciphertext: layouts (public) and plans (provider).

Diagonal methods, both baby-step / giant-step with hoisted baby steps, one ciphertext × plaintext level:

* ``hybrid`` (heads, fused map∘head; d_out small): the client puts x, zero-padded to n = next_pow2(d_in), in the
  first n slots (zeros elsewhere). With k = next_pow2(d_out) "hybrid" diagonals D_i[t] = M[t mod k, (t+i) mod n]
  (M = Aᵀ padded), u = Σ_i D_i ⊙ rot(x, i) holds per-class partial sums, and log2(slots/k) rotate-and-add steps fold
  them over the *whole* ring. That fold is the trace over the rotations by k, so the result message is exactly
  invariant under rotation by k (whatever the encoding rounding of x and of the diagonals): slot t holds class t mod k,
  and nothing but the k logits (and the rounding-sized padding classes and imaginary parts, which `sanitize.py` floods)
  is in it — no partial sum anywhere.
* ``replicated`` (maps, d_out comparable to d_in): blocks of B = next_pow2(d_in + d_out - 1) slots each hold one query
  replicated, x[t mod d_in]; with the d_in extended diagonals the outputs land in the first d_out slots of each block
  and every other slot is zero up to encoding rounding (flooded). B ≤ slots/2 packs several queries per ciphertext.

Levels (`presets.py`): the query arrives at degree 2 on three towers; baby-step rotations are hoisted there (one digit
decomposition of the fresh ciphertext); each giant-step inner sum is rescaled to two towers before it is rotated, and
the fold runs on two towers. `sanitize.sanitize` then re-randomizes, floods and rescales to one tower.

Every diagonal is encoded with randomized rounding (`smoothing.py`), fresh per plan, and a plan re-samples itself
after `smoothing.evaluation_budget` evaluations: what the result holds beyond the logits is then a Gaussian the client
could sample itself. No diagonal is skipped, zero or not (which ones are zero would tell about A).

Scaling keeps every slot inside the preset's headroom: inputs arrive as x / input_bound ∈ [-1, 1]; the plan divides
A by a power of two s so that every output row's 1-norm (which bounds every partial sum, hence every intermediate
slot) is at most headroom/8; the bias is added with the flood, costing no level. The client multiplies by
output_scale = s · input_bound.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import numpy as np
import openfhe as fhe

from linalign_jax.errors import LinalignError
from linalign_jax.helix import smoothing
from linalign_jax.helix.presets import CkksPreset, choose_preset, context_for, get_preset
from linalign_jax.helix.sanitize import fresh_generator, sanitize
from linalign_jax.shapes import bucket

METHODS = ("hybrid", "replicated")
# Relative cost of the primitive operations at one thread (ring 8192, 3 towers, measured roughly: EvalMult(ct, pt)
# 0.3 ms, hoisted rotation 3 ms, rotation of a two-tower ciphertext 3.5 ms, Rescale 0.8 ms); only used to pick a
# method.
_COST_MULT, _COST_HOISTED, _COST_ROTATE, _COST_RESCALE = 0.3, 3.0, 3.5, 0.8
VALUE_BUDGET_FRACTION = 1 / 8  # |every intermediate slot| <= headroom * this, before bias and flooding


def _split_bsgs(n_diagonals: int) -> tuple[int, int]:
    """(n1, n2) with n1 a power of two near sqrt, n1 * n2 >= n_diagonals."""
    n1 = bucket(max(1, math.isqrt(n_diagonals)))
    return n1, -(-n_diagonals // n1)


@dataclasses.dataclass(frozen=True)
class LinearLayout:
    """Public description of how one affine layer is packed: enough for the client to pick keys and pack inputs."""

    method: str
    d_in: int
    d_out: int
    preset: str
    period: int  # hybrid: input period n; replicated: block size B
    n_diagonals: int  # hybrid: padded number of outputs k (also the fold stride); replicated: d_in
    n1: int
    n2: int
    kind: str = "linear"

    @property
    def slots(self) -> int:
        return get_preset(self.preset).slots

    @property
    def fold_steps(self) -> int:
        """Rotate-and-add steps that sum the k-strided partial sums over the whole ring (a full trace)."""
        return int(math.log2(self.slots // self.n_diagonals)) if self.method == "hybrid" else 0

    @property
    def queries_per_ciphertext(self) -> int:
        return self.slots // self.period if self.method == "replicated" else 1

    def rotation_indices(self) -> tuple[int, ...]:
        baby = range(1, self.n1)
        giant = (g * self.n1 for g in range(1, self.n2))
        fold = (self.n_diagonals << s for s in range(self.fold_steps))
        return tuple(sorted({*baby, *giant, *fold}))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def pack_queries(self, queries: np.ndarray) -> np.ndarray:
        """Slot vector for scaled queries [m, d_in] (m <= queries_per_ciphertext)."""
        out = np.zeros(self.slots)
        if self.method == "hybrid":
            out[: self.d_in] = queries[0]
        else:
            blocks = out.reshape(-1, self.period)
            blocks[: len(queries)] = np.tile(queries, -(-self.period // self.d_in))[:, : self.period]
        return out

    def unpack_outputs(self, values: np.ndarray, m: int) -> np.ndarray:
        """Outputs [m, d_out] from a decrypted result slot vector."""
        return values.reshape(-1, self.period)[:m, : self.d_out].copy()

    def output_mask(self, m: int) -> np.ndarray:
        """True at the slots the client reads for m queries (their real parts); every other slot is flooded."""
        mask = np.zeros(self.slots, dtype=bool)
        mask.reshape(-1, self.period)[:m, : self.d_out] = True
        return mask

    def cost_ms(self) -> float:
        """Rough single-thread milliseconds of one evaluation, i.e. the latency of a query (for choosing a method)."""
        products = self.n_diagonals if self.method == "hybrid" else self.d_in
        return ((self.n1 - 1) * _COST_HOISTED + products * _COST_MULT + self.n2 * _COST_RESCALE
                + (self.n2 - 1 + self.fold_steps) * _COST_ROTATE)


def plan_layout(d_in: int, d_out: int, preset: CkksPreset | str | None = None, method: str = "auto") -> LinearLayout:
    """The layout for an affine layer [d_in → d_out], from public shapes only.

    `preset=None` picks the smallest 128-bit ring that fits; `method="auto"` takes the feasible method with the lower
    latency (hybrid for heads, replicated for maps; replicated also packs several queries when its block allows).
    """
    if not (isinstance(d_in, (int, np.integer)) and isinstance(d_out, (int, np.integer)) and d_in >= 1 and d_out >= 1):
        raise LinalignError(f"layer shape must be positive integers, got d_in={d_in!r}, d_out={d_out!r}")
    if method != "auto" and method not in METHODS:
        raise LinalignError(f"unknown method {method!r}; expected 'auto' or one of {METHODS}")
    d_in, d_out = int(d_in), int(d_out)
    candidates = []
    for m in (METHODS if method == "auto" else (method,)):
        if m == "hybrid":
            period, n_diag = bucket(d_in), bucket(d_out)
            if n_diag > period:
                continue
        else:
            period, n_diag = bucket(d_in + d_out - 1), d_in
        try:
            p = get_preset(preset) if preset is not None else choose_preset(period)
        except LinalignError:
            continue
        if period > p.slots:
            continue
        candidates.append(LinearLayout(m, d_in, d_out, p.name, period, n_diag, *_split_bsgs(n_diag)))
    if not candidates:
        raise LinalignError(f"no {method} layout fits a [{d_in} → {d_out}] layer on preset {preset or 'auto'}")
    return min(candidates, key=LinearLayout.cost_ms)


def weight_scale(output_abs_sums: np.ndarray, budget: float) -> float:
    """The smallest power of two s with (max over outputs of the 1-norm of its weights) / s <= budget (s < 1 for tiny
    weights). With inputs in [-1, 1] this bounds every partial sum of every output, hence every intermediate slot."""
    top = float(np.max(output_abs_sums)) if output_abs_sums.size else 0.0
    return 2.0 ** math.ceil(math.log2(top / budget)) if top > 0 else 1.0


def check_weights(A: np.ndarray, a: np.ndarray | None, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 A [d_in, d_out] and a [d_out] (zeros if None), or LinalignError naming the bad shape or value."""
    A = np.asarray(A, dtype=np.float64)
    a = np.zeros(d_out) if a is None else np.asarray(a, dtype=np.float64)
    if A.shape != (d_in, d_out) or a.shape != (d_out,):
        raise LinalignError(f"weights A {A.shape} and bias {a.shape}, expected ({d_in}, {d_out}) and ({d_out},)")
    for name, v in (("weights", A), ("bias", a)):
        if not np.isfinite(v).all():
            raise LinalignError(f"{name} contain non-finite values at {np.argwhere(~np.isfinite(v))[0].tolist()}")
    return A, a


def scaled_bias(a: np.ndarray, scale: float, input_bound: float, budget: float) -> np.ndarray:
    """The bias in the units of the encrypted outputs (x / input_bound times A / scale), checked against the budget."""
    bias = a / (scale * input_bound)
    if bias.size and np.abs(bias).max() > budget:
        raise LinalignError(f"bias |{np.abs(a).max():.3g}| is too large for input_bound {input_bound:.3g} "
                            f"(scaled {np.abs(bias).max():.3g} > budget {budget:.3g}); use a larger input_bound")
    return bias


class LinearPlan:
    """The provider's encoded diagonals for one layer, layout and preset; built once, shared by all sessions, and
    re-encoded with fresh randomness every `evaluation_budget` evaluations."""

    def __init__(self, layout: LinearLayout, A_scaled: np.ndarray, scale: float, bias: np.ndarray):
        self.layout, self.scale, self._bias = layout, scale, bias
        self.preset = get_preset(layout.preset)
        self.value_budget = self.preset.headroom * VALUE_BUDGET_FRACTION
        self.evaluation_budget = smoothing.evaluation_budget(self.preset, layout.d_in)
        self._A_scaled, self._lock = A_scaled, threading.Lock()
        self._groups, self._left = self._encode(), self.evaluation_budget

    @classmethod
    def build(cls, layout: LinearLayout, A: np.ndarray, a: np.ndarray | None = None,
              scale: float | None = None) -> "LinearPlan":
        """Encode y = x A + a.

        Head: A = V [d, k], a = c. Map: A = W [d_in, d_out], a = b. Fused map∘head: A = W V, a = b V + c. `scale`:
        the power of two A is divided by (default: the smallest that keeps every output's 1-norm in the budget)."""
        A, a = check_weights(A, a, layout.d_in, layout.d_out)
        preset = get_preset(layout.preset)
        if scale is None:  # plans whose results are summed (the fit's sample blocks) share one scale given by the caller
            scale = weight_scale(np.abs(A).sum(axis=0), preset.headroom * VALUE_BUDGET_FRACTION)
        return cls(layout, A / scale, scale, a)

    @property
    def evaluations_left(self) -> int:
        return self._left

    def _encode(self) -> list[tuple[int, list[tuple[int, fhe.Plaintext]]]]:
        """Randomized plaintexts of every diagonal (pre-rotated for its giant step), from a fresh generator."""
        layout, preset, rng = self.layout, self.preset, fresh_generator()
        cc, slots, n1 = context_for(preset), preset.slots, layout.n1
        diagonals = (_hybrid_diagonals if layout.method == "hybrid" else _replicated_diagonals)(layout, self._A_scaled)
        indices = [(g, b) for g in range(layout.n2) for b in range(n1) if diagonals(g * n1 + b) is not None]
        smoothing.check_smoothing(len(indices) * preset.ring_dim)
        groups: dict[int, list[tuple[int, fhe.Plaintext]]] = {}
        for g, b in indices:
            pre_rotated = np.roll(np.tile(diagonals(g * n1 + b), slots // layout.period), g * n1)  # rot(D, -g*n1)
            groups.setdefault(g, []).append((b, smoothing.randomized_plaintext(cc, pre_rotated, preset, rng)))
        return sorted(groups.items())

    def _take_encoding(self) -> list[tuple[int, list[tuple[int, fhe.Plaintext]]]]:
        """The encoding for one evaluation, re-sampled once the current one has served its budget."""
        with self._lock:
            if self._left <= 0:
                self._groups, self._left = self._encode(), self.evaluation_budget
            self._left -= 1
            return self._groups

    def apply(self, cc: fhe.CryptoContext, public_key: fhe.PublicKey, ct: fhe.Ciphertext, input_bound: float,
              n: int) -> tuple[fhe.Ciphertext, float]:
        """Evaluate on a validated fresh ciphertext holding `n` queries; returns (sanitized 1-tower result, output
        scale)."""
        return self.finish(cc, public_key, self.transform(cc, ct), input_bound, n)

    def finish(self, cc: fhe.CryptoContext, public_key: fhe.PublicKey, acc: fhe.Ciphertext, input_bound: float,
               n: int) -> tuple[fhe.Ciphertext, float]:
        """Bias and sanitization of a `transform` output (or of a sum of them under one scale)."""
        bias = np.zeros(self.layout.slots)
        bias.reshape(-1, self.layout.period)[:n, : self.layout.d_out] = scaled_bias(self._bias, self.scale, input_bound,
                                                                                   self.value_budget)
        result = sanitize(cc, public_key, acc, self.preset, bias, self.layout.output_mask(n))
        return result, self.scale * input_bound

    def transform(self, cc: fhe.CryptoContext, ct: fhe.Ciphertext) -> fhe.Ciphertext:
        """Enc(x_s A / scale) in the layout's output slots, two towers at degree 2, before bias and sanitization."""
        groups = self._take_encoding()
        baby = {0: ct}
        needed = sorted({b for _, members in groups for b, _ in members} - {0})
        if needed:
            digits = cc.EvalFastRotationPrecompute(ct)
            m = cc.GetCyclotomicOrder()
            baby.update((b, cc.EvalFastRotation(ct, b, m, digits)) for b in needed)
        acc = None
        for g, members in groups:
            products = [cc.EvalMult(baby[b], pt) for b, pt in members]
            inner = cc.Rescale(cc.EvalAddMany(products) if len(products) > 1 else products[0])
            if g:
                inner = cc.EvalRotate(inner, g * self.layout.n1)
            acc = inner if acc is None else cc.EvalAdd(acc, inner)
        for s in range(self.layout.fold_steps):
            acc = cc.EvalAdd(acc, cc.EvalRotate(acc, self.layout.n_diagonals << s))
        return acc


def _hybrid_diagonals(layout: LinearLayout, A: np.ndarray):
    """i -> D_i[t] = M[t mod k, (t + i) mod n] over one period n (M = Aᵀ zero-padded to [k, n])."""
    k, n = layout.n_diagonals, layout.period
    M = np.zeros((k, n))
    M[: layout.d_out, : layout.d_in] = A.T
    t = np.arange(n)

    def diagonal(i: int) -> np.ndarray | None:
        return M[t % k, (t + i) % n] if i < k else None

    return diagonal


def _replicated_diagonals(layout: LinearLayout, A: np.ndarray):
    """i -> D_i[t] = M[t, (t + i) mod d_in] for t < d_out, 0 up to the block size B (M = Aᵀ)."""
    B, d_in, d_out = layout.period, layout.d_in, layout.d_out
    M = A.T
    t = np.arange(d_out)

    def diagonal(i: int) -> np.ndarray | None:
        if i >= d_in:
            return None
        out = np.zeros(B)
        out[:d_out] = M[t, (t + i) % d_in]
        return out

    return diagonal
