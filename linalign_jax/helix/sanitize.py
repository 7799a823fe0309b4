"""Sanitization of every ciphertext the provider returns: what the client can compute with its secret key must not
depend on the provider's weights beyond the protocol's outputs.

The client holds s and knows its own encryption randomness, so it can read c0 + c1·s exactly (`audit.py`): the
encoded message plus the whole noise polynomial, every complex slot. Three channels, three measures:

1. **c1** is a known linear function of the client's c1 and the provider's plaintexts. Fix: add a *fresh* encryption
   under the client's public key (new randomness per response), which makes c1 an RLWE sample the client cannot
   explain (computational, RLWE with the client's own ring parameters).
2. **The noise** e (the client's fresh noise ⊛ weights, key-switching and rescale rounding: all weight-dependent) is
   covered by a fresh flood u with iid coefficients of standard deviation σ_F (statistical). If every coefficient of
   e satisfies |e_j| ≤ B, then SD(e + u, u) ≤ ||e||_2 / (2 σ_F) ≤ sqrt(N)·B / (2 σ_F) for Gaussian u (Pinsker on the
   KL divergence ||e||²/(2σ²)); σ_F = 2^(λ-1)·sqrt(N)·B gives 2^-λ. We use λ = 40 and B = 2^NOISE_BOUND_LOG2
   (the measured maximum is logged by the tests; `tests/helix/test_sanitize.py` checks it stays ≥ 16× below B).
   The flood is added at the level where the message sits at scale Δ² = 2^96, so it costs little precision:
   σ_F = 2^(39 + 6.5 + 20) = 2^65.5, i.e. slot noise ≈ σ_F·sqrt(N/2)/2^96 ≈ 2^-24.5 (the final rescale by q1 keeps the
   ratio). OpenFHE encodes a degree-2 plaintext on a coarse grid (its float encoder keeps 52 significant bits, the
   low bits are zeros), so the flood is the sum of that coarse Gaussian and a fine one (std 2^46, exact integers,
   encoded at degree 1 and relabelled): the fine part smooths the coarse grid (spacing ≤ 2^40) to within e^(-2π²·64)
   of a continuous Gaussian.
3. **The message** itself: imaginary parts and unread slots. The layouts make the result message exactly invariant
   under rotation by k' (the fold is a full trace, see `linear.py`), so the message holds k' complex values
   replicated; the client reads the real parts of the k logits. Everything else (imaginary parts; the k' - k padding
   classes; in `replicated`/bulk layouts, the unread slots) gets a fresh complex Gaussian of std `MESSAGE_FLOOD`
   (in slot units, against values ≤ headroom/8 = 4): those values are projections of CKKS encoding rounding (≤ 2^-30 of
   the values) and are hidden with λ ≈ 30 only — the one place where the parameters cannot reach 40 at ring 8192
   (stated in the README threat model).

Randomness: every draw comes from a numpy Generator seeded with 256 bits from os.urandom, new per response.
"""
from __future__ import annotations

import math
import os

import numpy as np
import openfhe as fhe

from linalign_jax.helix.presets import CkksPreset

LAMBDA = 40
NOISE_BOUND_LOG2 = 20.0  # B: |coefficient| of the weight-dependent noise at the flooding point (measured ≤ 2^16)
FINE_FLOOD_LOG2 = 46.0  # std of the fine (exact-integer) part of the flood
MESSAGE_FLOOD = 64.0  # std (slot units) of the flood on imaginary parts and unread slots; values are ≤ headroom/8


def noise_flood_log2(preset: CkksPreset) -> float:
    """log2 σ_F = λ - 1 + log2 sqrt(N) + log2 B (see the module doc)."""
    return LAMBDA - 1 + 0.5 * math.log2(preset.ring_dim) + NOISE_BOUND_LOG2


def fresh_generator() -> np.random.Generator:
    """A generator seeded with 256 bits from the OS CSPRNG: the client cannot predict or reproduce its draws."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "little")))


def sanitize(cc: fhe.CryptoContext, public_key: fhe.PublicKey, ct: fhe.Ciphertext, preset: CkksPreset,
             message: np.ndarray, read: np.ndarray, message_flood: float = MESSAGE_FLOOD) -> fhe.Ciphertext:
    """Re-randomize and flood `ct` (level 1, degree 2) and rescale it to one tower.

    `message` (real, slots) is added to the message (the bias); `read` marks the slots whose real parts the client
    reads. Every other real part and every imaginary part gets the message flood (`message_flood` = 0 only to
    measure the noise flood alone)."""
    rng = fresh_generator()
    slots, scale2 = preset.slots, preset.base_scale ** 2
    # coefficient std σ ↔ slot std per real component σ·sqrt(N/2)/scale (the embedding is sqrt(N/2)·unitary)
    tau = 2.0 ** noise_flood_log2(preset) * math.sqrt(preset.ring_dim / 2) / scale2
    values = message + rng.normal(0.0, tau, slots) + 1j * rng.normal(0.0, tau, slots)
    values += np.where(read, 0.0, rng.normal(0.0, message_flood, slots)) + 1j * rng.normal(0.0, message_flood, slots)
    coarse = cc.Encrypt(public_key, cc.MakeCKKSPackedPlaintext(values.tolist(), 2, 1))  # fresh Enc_pk(0) + flood
    tau_fine = 2.0 ** FINE_FLOOD_LOG2 * math.sqrt(preset.ring_dim / 2) / preset.base_scale
    fine = cc.MakeCKKSPackedPlaintext((rng.normal(0.0, tau_fine, slots) + 1j * rng.normal(0.0, tau_fine, slots))
                                      .tolist(), 1, 1)
    fine.SetNoiseScaleDeg(2)  # add its exact integer coefficients as they are (a degree-1 encoding, relabelled)
    return cc.Rescale(cc.EvalAdd(cc.EvalAdd(ct, coarse), fine))
