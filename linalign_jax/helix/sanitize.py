"""Sanitization of every ciphertext the provider returns: what the client can compute with its secret key must not
depend on the provider's weights beyond the protocol's outputs, up to statistical distance 2^-LAMBDA per response.

The client holds s and knows its own encryption randomness, so it can read c0 + c1·s exactly (`audit.py`): the
encoded message plus the whole noise polynomial, every complex slot. Three channels, three measures:

1. **c1** is a known linear function of the client's c1 and the provider's plaintexts. Fix: add a *fresh* encryption
   under the client's public key (new randomness per response), which makes c1 an RLWE sample the client cannot
   explain (computational, RLWE with the client's own ring parameters).
2. **The noise** e (the client's fresh noise ⊛ weights, key-switching and rescale rounding: all weight-dependent) is
   covered by a fresh flood u with iid coefficients (statistical), the sum of two independent shares: u₁ of std
   σ₁ for this channel, u₂ for channel 3. If every coefficient of e satisfies |e_j| ≤ B, then
   SD(e + u₁, u₁) ≤ ||e||_2 / (2 σ₁) ≤ sqrt(N)·B / (2 σ₁) for Gaussian u₁ (Pinsker on the KL divergence);
   σ₁ = 2^(NOISE_LAMBDA - 1)·sqrt(N)·B gives 2^-NOISE_LAMBDA. We use NOISE_LAMBDA = 40.5 and B = 2^NOISE_BOUND_LOG2
   (the tests check the measured maximum stays ≥ 16× below B): σ₁ = 2^(39.5 + 6.5 + 20) = 2^66; u₂ (std 2^65.3,
   `smoothing.domination_std` for 2^20 evaluations at d_in = slots) makes σ_F = 2^66.2. The flood is added at the
   level where the message sits at scale Δ² = 2^96, so it costs little precision: slot noise
   τ = σ_F·sqrt(N/2)/2^96 = 2^-23.8 (the final rescale by q1 keeps the ratio). OpenFHE encodes a degree-2 plaintext on
   a coarse grid (its float encoder keeps 52 significant bits, the low bits are zeros), so the flood is the sum of
   that coarse Gaussian and a fine one (std 2^46, exact integers, encoded at degree 1 and relabelled): the fine part
   smooths the coarse grid (spacing ≤ 2^40) to within e^(-2π²·64) of a continuous Gaussian.
3. **The message** itself: imaginary parts, padding classes, unread slots — where the deterministic encoding of the
   weights would leave its rounding residue, a fixed function of V. The provider's plaintexts are encoded with
   randomized rounding (`smoothing.py`): with u₂ (and the std-`MESSAGE_FLOOD` Gaussian on every component the
   client does not read) the whole message is within 4ε = 2^-44 per plan of a Gaussian centred on
   the logits (and on 0 elsewhere) with a covariance the client knows; what remains (the client's own encoding
   rounding, the center's long-double error) is below the std-64 flood with λ > 42.
Together: ≤ 2^-40.5 + 2^-44 + 2^-43 = 2^-40.16 < 2^-LAMBDA per response (over Q responses the KL terms add: ≤ √Q·2^-40).

Randomness: every draw comes from a numpy Generator seeded with 256 bits from os.urandom, new per response.
"""
from __future__ import annotations

import math
import os

import numpy as np
import openfhe as fhe

from linalign_jax.helix import smoothing
from linalign_jax.helix.presets import CkksPreset

LAMBDA = 40  # the statistical parameter of every response (channels 2 and 3 together)
NOISE_LAMBDA = 40.5  # channel 2's share
NOISE_BOUND_LOG2 = 20.0  # B: |coefficient| of the weight-dependent noise at the flooding point (measured ≤ 2^16)
FINE_FLOOD_LOG2 = 46.0  # std of the fine (exact-integer) part of the flood
MESSAGE_FLOOD = 64.0  # std (slot units) of the flood on imaginary parts and unread slots; values are ≤ headroom/8


def noise_flood_log2(preset: CkksPreset) -> float:
    """log2 σ_F, σ_F² = σ₁² + σ₂² (see the module doc): σ₁ = 2^(NOISE_LAMBDA - 1)·sqrt(N)·B covers the noise, σ₂
    is the coefficient std of smoothing's domination share (slot std τ₂ ↔ coefficient std τ₂·Δ²/sqrt(N/2))."""
    sigma1 = 2.0 ** (NOISE_LAMBDA - 1 + 0.5 * math.log2(preset.ring_dim) + NOISE_BOUND_LOG2)
    tau2 = smoothing.domination_std(preset, preset.slots, smoothing.EVALUATIONS_PER_ENCODING)
    sigma2 = tau2 * preset.base_scale ** 2 / math.sqrt(preset.ring_dim / 2)
    return 0.5 * math.log2(sigma1 ** 2 + sigma2 ** 2)


def read_noise_std(preset: CkksPreset) -> float:
    """τ: the flood's std per real slot component, in slot units (coefficient std σ ↔ σ·sqrt(N/2)/Δ²)."""
    return 2.0 ** noise_flood_log2(preset) * math.sqrt(preset.ring_dim / 2) / preset.base_scale ** 2


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
    slots, tau = preset.slots, read_noise_std(preset)
    values = message + rng.normal(0.0, tau, slots) + 1j * rng.normal(0.0, tau, slots)
    values += np.where(read, 0.0, rng.normal(0.0, message_flood, slots)) + 1j * rng.normal(0.0, message_flood, slots)
    coarse = cc.Encrypt(public_key, cc.MakeCKKSPackedPlaintext(values.tolist(), 2, 1))  # fresh Enc_pk(0) + flood
    tau_fine = 2.0 ** FINE_FLOOD_LOG2 * math.sqrt(preset.ring_dim / 2) / preset.base_scale
    fine = cc.MakeCKKSPackedPlaintext((rng.normal(0.0, tau_fine, slots) + 1j * rng.normal(0.0, tau_fine, slots))
                                      .tolist(), 1, 1)
    fine.SetNoiseScaleDeg(2)  # add its exact integer coefficients as they are (a degree-1 encoding, relabelled)
    return cc.Rescale(cc.EvalAdd(cc.EvalAdd(ct, coarse), fine))
