"""CKKS parameter presets of HELIX and their OpenFHE contexts (one per process and preset).

Why these parameters: the provider only evaluates ciphertext × plaintext products (depth 1), so HYBRID key switching
with FLEXIBLEAUTO, ScalingModSize 40 and FirstModSize 50 gives ring 8192 (4096 slots) at 128-bit security; FirstModSize
60 is the next ring (16384, 8192 slots, more headroom), chosen automatically for d > 4096. `hyb_flood` adds OpenFHE's
noise-flooding decryption (opt-in). Values above a preset's headroom decrypt to garbage *without any error*, so the
client scales its inputs into [-1, 1] by a public `input_bound` and every plan scales its weights so that all slots of
every intermediate stay far inside the headroom (see `linear.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Sequence

import openfhe as fhe

from linalign_jax.errors import LinalignError

@dataclasses.dataclass(frozen=True)
class CkksPreset:
    """One CKKS parameter set (depth 1, HYBRID, FLEXIBLEAUTO).

    `headroom` bounds |slot value| after a ciphertext × plaintext product; it is a third or less of the measured value
    at which decryption silently breaks (hyb40_50 ~2.5e4, hyb40_60 ~5e7, hyb_flood ~90), and plans use a quarter of it.

    `flooding_noise_log2` switches on OpenFHE's NOISE_FLOODING_DECRYPT mode: decryption adds Gaussian noise sized from
    this (public, fixed) estimate of the circuit's own noise, so decrypted values no longer expose the secret-key-
    dependent CKKS error (Li–Micciancio). OpenFHE then picks its own moduli (ring 16384 here). The estimate must bound
    the log2 error OpenFHE measures for the circuit in EXEC_NOISE_ESTIMATION mode (`estimate_decryption_noise`).
    """

    name: str
    first_mod_size: int
    scaling_mod_size: int
    security: str  # name of an openfhe SecurityLevel
    ring_dim: int
    headroom: float
    flooding_noise_log2: float | None = None
    noise_estimation: bool = False  # OpenFHE's EXEC_NOISE_ESTIMATION pass for the flooding preset (not for serving)

    @property
    def slots(self) -> int:
        return self.ring_dim // 2

    @property
    def secure(self) -> bool:
        return self.security != "HEStd_NotSet"


# Upper bound on OpenFHE's measured log2 decryption error of every plan here (see `estimate_decryption_noise`).
FLOODING_NOISE_LOG2 = 14.0
PRESETS: dict[str, CkksPreset] = {
    p.name: p
    for p in (
        CkksPreset("hyb40_50", 50, 40, "HEStd_128_classic", 8192, 8192.0),
        CkksPreset("hyb40_60", 60, 40, "HEStd_128_classic", 16384, 2.0**23),
        CkksPreset("hyb_flood", 60, 40, "HEStd_128_classic", 16384, 32.0, flooding_noise_log2=FLOODING_NOISE_LOG2),
        CkksPreset("hyb_flood_estimate", 60, 40, "HEStd_128_classic", 16384, 32.0, noise_estimation=True),
        # Tests only: same moduli on a ring too small for any security level; providers refuse it by default.
        CkksPreset("insecure_n4096", 50, 40, "HEStd_NotSet", 4096, 8192.0),
    )
}
SECURE_PRESETS = tuple(name for name, p in PRESETS.items() if p.secure and not p.noise_estimation)


def get_preset(preset: CkksPreset | str) -> CkksPreset:
    if isinstance(preset, CkksPreset):
        return preset
    if preset not in PRESETS:
        raise LinalignError(f"unknown CKKS preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


AUTO_PRESETS = ("hyb40_50", "hyb40_60")  # what preset=None picks from, smallest ring first; flooding is opt-in


def choose_preset(slots_needed: int) -> CkksPreset:
    """The smallest 128-bit preset (without decryption flooding) whose ring holds `slots_needed` slots."""
    for name in AUTO_PRESETS:
        if PRESETS[name].slots >= slots_needed:
            return PRESETS[name]
    biggest = max(PRESETS[n].slots for n in AUTO_PRESETS)
    raise LinalignError(f"a layout needing {slots_needed} slots exceeds the largest preset ({biggest} slots)")


_CONTEXT_LOCK = threading.Lock()
# Every context here comes from GenCryptoContext (client bundles are matched byte-for-byte, never deserialized), so the
# context copy embedded in each deserialized ciphertext only resolves to the cached one: precomputing its CRT tables
# again would be wasted work (2 of the 3 ms a ciphertext takes to deserialize at ring 8192, measured). Process-global.
fhe.DisablePrecomputeCRTTablesAfterDeserializaton()


def context_for(preset: CkksPreset | str) -> fhe.CryptoContext:
    """The crypto context of a preset, one object per process: plaintexts encoded once serve every session, and the
    contexts embedded in deserialized ciphertexts resolve to it (OpenFHE caches contexts by parameters)."""
    return _context(get_preset(preset))


@functools.lru_cache(maxsize=None)
def canonical_context_bytes(preset: CkksPreset) -> bytes:
    return fhe.Serialize(_context(preset), fhe.BINARY)


@functools.lru_cache(maxsize=None)
def _context(preset: CkksPreset) -> fhe.CryptoContext:
    params = fhe.CCParamsCKKSRNS()
    params.SetMultiplicativeDepth(1)
    params.SetScalingModSize(preset.scaling_mod_size)
    params.SetFirstModSize(preset.first_mod_size)
    params.SetSecurityLevel(getattr(fhe, preset.security))
    params.SetScalingTechnique(fhe.ScalingTechnique.FLEXIBLEAUTO)
    params.SetKeySwitchTechnique(fhe.KeySwitchTechnique.HYBRID)
    if not preset.secure:
        params.SetRingDim(preset.ring_dim)
    if preset.noise_estimation:
        params.SetDecryptionNoiseMode(fhe.NOISE_FLOODING_DECRYPT)
        params.SetExecutionMode(fhe.EXEC_NOISE_ESTIMATION)
    if preset.flooding_noise_log2 is not None:
        params.SetDecryptionNoiseMode(fhe.NOISE_FLOODING_DECRYPT)
        params.SetExecutionMode(fhe.EXEC_EVALUATION)
        params.SetNoiseEstimate(preset.flooding_noise_log2)
        params.SetDesiredPrecision(25)
        params.SetStatisticalSecurity(30)
        params.SetNumAdversarialQueries(1)
    with _CONTEXT_LOCK:
        cc = fhe.GenCryptoContext(params)
        for feature in (fhe.PKE, fhe.KEYSWITCH, fhe.LEVELEDSHE, fhe.ADVANCEDSHE):  # ADVANCEDSHE: EvalAddMany
            cc.Enable(feature)
    if cc.GetRingDimension() != preset.ring_dim:
        raise LinalignError(f"preset {preset.name}: OpenFHE chose ring {cc.GetRingDimension()}, "
                            f"expected {preset.ring_dim}")
    return cc


def preset_of_context_bytes(cc_bytes: bytes, allowed: Sequence[str]) -> CkksPreset:
    """The allowed preset whose context serializes to exactly `cc_bytes` (OpenFHE's serialization is deterministic).

    Comparing bytes instead of deserializing keeps the client's context bytes away from OpenFHE's parser, which
    crashes the process on some malformed inputs (e.g. zeros) instead of raising.
    """
    for name in allowed:
        if canonical_context_bytes(PRESETS[name]) == cc_bytes:
            return PRESETS[name]
    raise LinalignError(f"session bundle: the crypto context ({len(cc_bytes)} B) is not the serialization of any "
                        f"allowed preset {list(allowed)} (other ring, moduli or techniques, or malformed)")
