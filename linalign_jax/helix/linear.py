"""Encrypted affine layers y = x A + a (A [d_in, d_out]) on one ciphertext: layouts (public) and plans (provider).

Diagonal methods, all baby-step / giant-step with hoisted baby steps, all depth 1:

* ``hybrid`` (heads, fused map∘head; d_out small): the client tiles x, zero-padded to n = next_pow2(d_in), with
  period n over all slots. With k = next_pow2(d_out) "hybrid" diagonals D_i[t] = M[t mod k, (t+i) mod n] (M = Aᵀ
  padded), u = Σ_i D_i ⊙ rot(x, i) holds per-class partial sums, and log2(n/k) rotate-and-add steps fold them. Because
  input and diagonals are periodic, *every* slot of the result holds a logit (slot t: class t mod k) or an exact zero
  (padding classes): no partial sum, i.e. nothing about the weights beyond the logits, survives in unused slots.
* ``replicated`` (maps, d_out comparable to d_in): blocks of B = next_pow2(d_in + d_out - 1) slots each hold one query
  replicated, x[t mod d_in]; with the d_in extended diagonals the outputs land in the first d_out slots of each block
  and every other slot is an exact zero. B ≤ slots/2 packs several queries per ciphertext.
* ``hybrid_client_fold`` (opt-in): hybrid without the provider's log2(n/k) fold rotations; the client sums the
  k-strided partial sums itself. The provider adds a fresh mask whose blocks sum to zero per output, so the client
  still gets exact outputs, but the partial sums are only *statistically* hidden (mask magnitude is capped by the
  headroom), unlike the exact hiding of ``hybrid``. Faster (7 of 17 rotations fewer at d=4096, k=20).

Baby-step rotations are hoisted (one digit decomposition of the fresh ciphertext); each giant-step inner sum is
compressed to one RNS tower before it is rotated, which halves the cost of every later rotation, and the fold runs on
one tower too. The result is already one tower when it is returned.

Scaling keeps every slot inside the preset's headroom: inputs arrive as x / input_bound ∈ [-1, 1]; the plan divides
A by a power of two s so that every output row's 1-norm (which bounds every partial sum, hence every intermediate
slot) is at most headroom/16; bias and a fresh uniform flood of magnitude headroom/4 (all non-output slots, drawn from
the OS CSPRNG per query) are added as one plaintext, costing no depth. The client multiplies by
output_scale = s · input_bound.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import openfhe as fhe

from linalign_jax.errors import LinalignError
from linalign_jax.helix.encoding import random_uniform
from linalign_jax.helix.keys import KEYS
from linalign_jax.helix.presets import CkksPreset, choose_preset, context_for, get_preset

METHODS = ("hybrid", "replicated", "hybrid_client_fold")
AUTO_METHODS = ("hybrid", "replicated")  # client fold trades exact hiding for speed: opt-in only
_HYBRID = ("hybrid", "hybrid_client_fold")
# Relative cost of the primitive operations at one thread (ring 8192, measured: EvalMult(ct, pt) 0.19 ms, hoisted
# rotation 2.0 ms, rotation of a one-tower ciphertext 1.8 ms, Compress 0.8 ms); only used to pick a method.
_COST_MULT, _COST_HOISTED, _COST_ROTATE_1T, _COST_COMPRESS = 0.19, 2.0, 1.8, 0.8
VALUE_BUDGET_FRACTION = 1 / 16  # |every intermediate slot| <= headroom * this, before bias and flooding
FLOOD_FRACTION = 1 / 4  # |flood| <= headroom * this


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def _split_bsgs(n_diagonals: int) -> tuple[int, int]:
    """(n1, n2) with n1 a power of two near sqrt, n1 * n2 >= n_diagonals."""
    n1 = _next_pow2(max(1, math.isqrt(n_diagonals)))
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
        """Rotate-and-add steps the provider runs to sum the k-strided partial sums (the client does them itself in
        hybrid_client_fold)."""
        return int(math.log2(self.period // self.n_diagonals)) if self.method == "hybrid" else 0

    @property
    def read_slots(self) -> int:
        """Slots of one query's block that the client reads: d_out, or the whole first period when it folds."""
        return self.period if self.method == "hybrid_client_fold" else self.d_out

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
        if self.method in _HYBRID:
            out.reshape(-1, self.period)[:, : self.d_in] = queries[0]
        else:
            blocks = out.reshape(-1, self.period)
            blocks[: len(queries)] = np.tile(queries, -(-self.period // self.d_in))[:, : self.period]
        return out

    def unpack_outputs(self, values: np.ndarray, m: int) -> np.ndarray:
        """Outputs [m, d_out] from a decrypted result slot vector (summing the masked partial sums when the client
        folds)."""
        read = values.reshape(-1, self.period)[:m, : self.read_slots]
        if self.method == "hybrid_client_fold":
            read = read.reshape(m, -1, self.n_diagonals).sum(axis=1)
        return read[:, : self.d_out].copy()

    def output_mask(self, m: int) -> np.ndarray:
        """True at the slots the client reads for m queries; every other slot is flooded."""
        mask = np.zeros(self.slots, dtype=bool)
        mask.reshape(-1, self.period)[:m, : self.read_slots] = True
        return mask

    def cost_ms(self) -> float:
        """Rough single-thread milliseconds of one evaluation, i.e. the latency of a query (for choosing a method)."""
        products = self.n_diagonals if self.method in _HYBRID else self.d_in
        return ((self.n1 - 1) * _COST_HOISTED + products * _COST_MULT + self.n2 * _COST_COMPRESS
                + (self.n2 - 1 + self.fold_steps) * _COST_ROTATE_1T)


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
    for m in (AUTO_METHODS if method == "auto" else (method,)):
        if m in _HYBRID:
            period, n_diag = _next_pow2(d_in), _next_pow2(d_out)
            if n_diag > period:
                continue
        else:
            period, n_diag = _next_pow2(d_in + d_out - 1), d_in
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
    """The provider's encoded diagonals for one layer, layout and preset; built once, shared by all sessions."""

    def __init__(self, layout: LinearLayout, scale: float, bias: np.ndarray,
                 groups: list[tuple[int, list[tuple[int, fhe.Plaintext]]]]):
        self.layout, self.scale, self._bias, self._groups = layout, scale, bias, groups
        self.preset = get_preset(layout.preset)
        self.value_budget = self.preset.headroom * VALUE_BUDGET_FRACTION
        self.flood_bound = self.preset.headroom * FLOOD_FRACTION

    @classmethod
    def build(cls, layout: LinearLayout, A: np.ndarray, a: np.ndarray | None = None) -> "LinearPlan":
        """Encode y = x A + a.

        Head: A = V [d, k], a = c. Map: A = W [d_in, d_out], a = b. Fused map∘head: A = W V, a = b V + c."""
        A, a = check_weights(A, a, layout.d_in, layout.d_out)
        preset = get_preset(layout.preset)
        scale = weight_scale(np.abs(A).sum(axis=0), preset.headroom * VALUE_BUDGET_FRACTION)
        cc = context_for(preset)
        slots, n1 = preset.slots, layout.n1
        diagonals = _hybrid_diagonals(layout, A / scale) if layout.method in _HYBRID else \
            _replicated_diagonals(layout, A / scale)
        groups = []
        for g in range(layout.n2):
            members = []
            for b in range(n1):
                diag = diagonals(g * n1 + b)
                if diag is None or not diag.any():
                    continue
                pre_rotated = np.roll(np.tile(diag, slots // len(diag)), g * n1)  # rot(D, -g*n1)
                members.append((b, cc.MakeCKKSPackedPlaintext(pre_rotated)))
            if members:
                groups.append((g, members))
        return cls(layout, scale, a, groups)

    def apply(self, cc: fhe.CryptoContext, ct: fhe.Ciphertext, input_bound: float,
              n: int) -> tuple[fhe.Ciphertext, float]:
        """Evaluate on a validated fresh ciphertext holding `n` queries; returns (1-tower result, output scale)."""
        finishing = cc.MakeCKKSPackedPlaintext(self._finishing_plaintext(input_bound, n), 1, 1)
        return cc.EvalAdd(self.transform(cc, ct), finishing), self.scale * input_bound

    def transform(self, cc: fhe.CryptoContext, ct: fhe.Ciphertext) -> fhe.Ciphertext:
        """Enc(x_s A / scale) in the layout's output slots, one tower, before bias and flooding."""
        baby = {0: ct}
        needed = sorted({b for _, members in self._groups for b, _ in members} - {0})
        if needed:
            digits = cc.EvalFastRotationPrecompute(ct)
            m = cc.GetCyclotomicOrder()
            baby.update((b, cc.EvalFastRotation(ct, b, m, digits)) for b in needed)
        acc = None
        for g, members in self._groups:
            products = [cc.EvalMult(baby[b], pt) for b, pt in members]
            inner = cc.Compress(cc.EvalAddMany(products) if len(products) > 1 else products[0], 1)
            if g:
                inner = cc.EvalRotate(inner, g * self.layout.n1)
            acc = inner if acc is None else cc.EvalAdd(acc, inner)
        if acc is None:  # all-zero weights: an encryption of zero at the right level, from the query itself
            acc = cc.Compress(cc.EvalMult(ct, 0.0), 1)
        for s in range(self.layout.fold_steps):
            acc = cc.EvalAdd(acc, cc.EvalRotate(acc, self.layout.n_diagonals << s))
        return acc

    def _finishing_plaintext(self, input_bound: float, n: int) -> np.ndarray:
        """Bias at the output slots of the n queries, fresh uniform flooding everywhere else. When the client folds,
        the first period instead gets a fresh mask whose k-strided blocks sum to zero for every output, so the client's
        block sums are exact while each partial sum is hidden (statistically: |mask| <= 2 * flood_bound)."""
        values = random_uniform(self.layout.slots, self.flood_bound)
        bias = scaled_bias(self._bias, self.scale, input_bound, self.value_budget)
        blocks = values.reshape(-1, self.layout.period)
        if self.layout.method == "hybrid_client_fold":  # one query per ciphertext
            mask = blocks[0].reshape(-1, self.layout.n_diagonals)
            mask -= mask.mean(axis=0)
            blocks[0, : self.layout.d_out] += bias
        else:
            blocks[:n, : self.layout.d_out] = bias
        return values


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


def estimate_decryption_noise(layout: LinearLayout, seed: int = 0) -> float:
    """OpenFHE's EXEC_NOISE_ESTIMATION pass for `layout` on the flooding preset's parameters: the log2 decryption
    error of the plan with weights at the full value budget and inputs at the bound. The `hyb_flood` preset's fixed,
    public estimate (`FLOODING_NOISE_LOG2`) must bound this for every layout served with it."""
    estimation = dataclasses.replace(layout, preset="hyb_flood_estimate")
    rng = np.random.default_rng(seed)
    A = rng.uniform(-1, 1, (layout.d_in, layout.d_out))
    plan = LinearPlan.build(estimation, A, None)
    cc = context_for(estimation.preset)
    keys = cc.KeyGen()
    KEYS.generate(cc, keys.secretKey, estimation.rotation_indices())
    try:
        x = estimation.pack_queries(rng.uniform(-1, 1, (1, layout.d_in)))
        ct = cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext(x))
        return float(cc.Decrypt(plan.apply(cc, ct, 1.0, 1)[0], keys.secretKey).GetLogError())
    finally:
        KEYS.remove(cc, keys.secretKey.GetKeyTag())
