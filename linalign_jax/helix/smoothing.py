"""Randomized encoding of the provider's plaintexts: what the result message holds beyond the logits becomes a
Gaussian the client could have sampled itself.

Why. A plaintext w (integer coefficients) encodes the slot values v = A / scale of one diagonal. The deterministic
encoder rounds the exact coefficients c = Δ·τ⁻¹(v) (Δ = 2^48, τ the canonical embedding), and the residue
round(c) − c is a fixed function of the weights that the result message carries into every imaginary part, every
padding class and every unread slot (a raw-decrypting client reads them: `audit.py`). Flooding those components
(std 64, all the headroom leaves) against a worst-case residue gives only λ ≈ 30 at ring 8192. Instead, every
coefficient is *sampled* from the discrete Gaussian D_{Z,c,r}, fresh per plan:

1. **Smoothing.** Let z = w − c ~ D_{Z^M − c, r} over all M = N·(plaintexts) coefficients of the plan and u' a
   continuous Gaussian of parameter s. If r·s/√(r² + s²) ≥ η_ε(Z^M) (the smoothing parameter,
   η_ε(Z^M) ≤ √(ln(2M(1 + 1/ε))/π)), then z + u' is within statistical distance 4ε of the continuous Gaussian of
   parameter √(r² + s²), whatever c is (Regev 2009, JACM 56(6), Claim 3.9). With r = s = 6, ε = 2^-46: valid for
   M ≤ 2^28 (checked at every build).
2. **Domination.** The client's raw view of the result is m = L(w) + f, L linear (known to the client: it is fixed
   by its own encoded queries, its inputs), f the provider's flood (`sanitize.py`: iid slot noise on every component,
   of which a share of std τ₂ is reserved here, plus std 64 on everything the client does not read). f's covariance
   contains σ_u²·L Lᵀ (σ_u = s/√(2π) the std of u') as long as τ₂² ≥ σ_u²·Q·ℓ², where ℓ bounds a read component's
   functional: it meets every plaintext slot once, times one query entry, so ℓ² ≤ (N/2)·d_in/Δ² (queries in
   [-1, 1]; components of different classes have disjoint supports) and Q evaluations of one plan add up. Then m = L(c) + L(z + u') + f'' ≈_4ε L(c) + Gaussian with a covariance the client knows:
   L(c) is the exact product of the weights with the client's encoded query in the read slots (the logits) and 0
   elsewhere up to the client's own encoding rounding (≤ 2^-80) and this module's center error (≤ 2^-16 per
   coefficient: extended-precision FFT, measured by the tests), both hidden by the std-64 flood with λ > 42.
   τ₂ is sized for Q = 2^20 at d_in = slots (τ₂ = 2^-24.7 at ring 8192); `evaluation_budget` is the Q it covers for
   a layout, and a plan re-samples itself when it has been used that often.

The plan skips no diagonal (which diagonals are zero would be structure of V outside the logits). Samplers are the
idealized float64 ones, as for every flood here.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import openfhe as fhe

from linalign_jax.errors import LinalignError
from linalign_jax.helix.presets import CkksPreset

R_PARAMETER = 6.0  # Gaussian parameter r of the coefficient sampler (std r/√(2π) ≈ 2.39)
S_PARAMETER = 6.0  # parameter s of the virtual continuous Gaussian u' carved out of the flood
EPSILON_LOG2 = -46.0  # smoothing error ε: 4ε = 2^-44 once per plan
EVALUATIONS_PER_ENCODING = 2 ** 20  # then a plan re-samples (at d_in = slots; more for smaller inputs)
CENTER_ERROR_LOG2 = -16.0  # budget on |computed center − exact center| per coefficient (long double FFT: ≈ 2^-19)
_TAIL = math.ceil(R_PARAMETER * math.sqrt(64 * math.log(2) / math.pi))  # ρ_r beyond this offset is < 2^-64


def smoothing_bound(coefficients: int, epsilon_log2: float = EPSILON_LOG2) -> float:
    """√(ln(2M(1 + 1/ε))/π) ≥ η_ε(Z^M) (Micciancio–Regev 2007, Lemma 3.3)."""
    return math.sqrt((math.log(2 * coefficients) + math.log1p(2.0 ** -epsilon_log2)) / math.pi)


def check_smoothing(coefficients: int) -> None:
    combined = R_PARAMETER * S_PARAMETER / math.hypot(R_PARAMETER, S_PARAMETER)
    if combined < smoothing_bound(coefficients):
        raise LinalignError(f"a plan of {coefficients} coefficients needs r·s/√(r²+s²) ≥ "
                            f"{smoothing_bound(coefficients):.3f}, have {combined:.3f}: split the layer")


def domination_std(preset: CkksPreset, d_in: int, evaluations: int) -> float:
    """τ₂: the per-component slot std of flood that contains σ_u²·L Lᵀ for `evaluations` evaluations of one
    encoding at input size d_in (τ₂² = σ_u²·Q·(N/2)·d_in/Δ², the domination inequality of the module doc)."""
    sigma_u = S_PARAMETER / math.sqrt(2 * math.pi)
    return sigma_u * math.sqrt(evaluations * (preset.ring_dim / 2) * d_in) / preset.base_scale


def evaluation_budget(preset: CkksPreset, d_in: int) -> int:
    """Evaluations one encoding may serve: the flood's share τ₂ is sized for EVALUATIONS_PER_ENCODING at d_in = slots
    (`sanitize.py`), and τ₂² ∝ Q·d_in, so smaller inputs get proportionally more."""
    return EVALUATIONS_PER_ENCODING * preset.slots // max(1, d_in)


@functools.lru_cache(maxsize=None)
def _positions(ring_dim: int) -> np.ndarray:
    """OpenFHE's slot t is p(ζ^(5^t)), ζ = e^(iπ/N): the index m of the odd power 2m+1 = 5^t mod 2N (the tests
    check this against a raw decryption)."""
    return (np.array([pow(5, t, 2 * ring_dim) for t in range(ring_dim // 2)]) - 1) // 2


_PI = np.longdouble("3.141592653589793238462643383279502884")


@functools.lru_cache(maxsize=None)
def _fft_tables(n: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(bit reversal, per-stage twiddles, the negacyclic twist ζ^-j / n), all in long double."""
    bits = n.bit_length() - 1
    reversal = np.array([int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)])
    stages = [np.exp(-1j * _PI * np.arange(m, dtype=np.longdouble) / m).astype(np.clongdouble)
              for m in (1 << s for s in range(bits))]
    twist = np.exp(-1j * _PI * np.arange(n, dtype=np.longdouble) / n).astype(np.clongdouble) / n
    return reversal, stages, twist


def _fft_long(x: np.ndarray) -> np.ndarray:
    """Forward DFT in complex long double (radix 2): 11 more bits than numpy's float64 FFT."""
    reversal, stages, _ = _fft_tables(len(x))
    a = np.asarray(x, dtype=np.clongdouble)[reversal]
    for w in stages:
        m = len(w)
        a = a.reshape(-1, 2 * m)
        u, t = a[:, :m].copy(), a[:, m:] * w
        a[:, :m], a[:, m:] = u + t, u - t
        a = a.reshape(-1)
    return a


def exact_center(values: np.ndarray, preset: CkksPreset) -> tuple[np.ndarray, np.ndarray]:
    """(c, residue): c = Δ·τ⁻¹(values) in long double, the coefficients the real slot values would have without
    rounding; residue, its imaginary part, is exactly 0 in exact arithmetic (a measure of the FFT's error)."""
    if np.finfo(np.longdouble).nmant < 63:  # e.g. macOS arm64 / Windows, where long double is float64
        raise LinalignError("HELIX plans need an extended-precision long double (64-bit mantissa) for the exact "
                            f"center of the randomized encoding; this platform's has {np.finfo(np.longdouble).nmant}")
    n, pos = preset.ring_dim, _positions(preset.ring_dim)
    powers = np.zeros(n, dtype=np.clongdouble)
    powers[pos] = values
    powers[n - 1 - pos] = np.conj(np.asarray(values, dtype=np.clongdouble))  # the conjugate roots
    coefficients = _fft_long(powers) * _fft_tables(n)[2]
    return coefficients.real * np.longdouble(preset.base_scale), coefficients.imag * np.longdouble(preset.base_scale)


def sample_coefficients(center: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64 samples of D_{Z, c_j, r} for every center c_j: inverse CDF of ρ_r(n - c_j) over ⌊c_j⌋ ± _TAIL (the
    tails beyond hold < 2^-64 of the mass)."""
    base = np.floor(center)
    frac = (center - base).astype(np.float64)  # exact: c − ⌊c⌋ of a long double
    offsets = np.arange(-_TAIL, _TAIL + 2, dtype=np.float64)
    weights = np.exp(-math.pi * (offsets[None, :] - frac[:, None]) ** 2 / R_PARAMETER ** 2)
    cdf = np.cumsum(weights, axis=1)
    u = rng.random(len(center))[:, None] * cdf[:, -1:]
    pick = (cdf < u).sum(axis=1)
    return base.astype(np.int64) + offsets[pick].astype(np.int64)


def odd_powers(coefficients: np.ndarray) -> np.ndarray:
    """p(ζ^(2j+1)) for j < N, ζ = e^(iπ/N), of real coefficients (float64): the canonical embedding, in root order."""
    n = len(coefficients)
    return np.fft.ifft(coefficients * np.exp(1j * np.pi * np.arange(n) / n)) * n


def plaintext_of_coefficients(cc: fhe.CryptoContext, coefficients: np.ndarray, preset: CkksPreset) -> fhe.Plaintext:
    """The degree-1 plaintext with exactly these integer coefficients: OpenFHE's encoder rounds Δ·τ⁻¹ of the slot
    values, and τ(w)/Δ in float64 comes back to w within 2^-3 (|w| < 2^47; the tests check it coefficient by
    coefficient)."""
    n = preset.ring_dim
    if np.abs(coefficients).max(initial=0) >= 2 ** 47:
        raise LinalignError("a plaintext coefficient exceeds 2^47: the encoding would not be exact")
    slots = odd_powers(coefficients.astype(np.float64))[_positions(n)] / preset.base_scale
    return cc.MakeCKKSPackedPlaintext(slots.tolist(), 1, 0)


def randomized_plaintext(cc: fhe.CryptoContext, values: np.ndarray, preset: CkksPreset,
                         rng: np.random.Generator) -> fhe.Plaintext:
    """A plaintext of the real slot `values` whose coefficients are D_{Z, Δ·τ⁻¹(values), r} samples."""
    center, _ = exact_center(values, preset)
    return plaintext_of_coefficients(cc, sample_coefficients(center, rng), preset)
