"""CKKS parameter presets of HELIX and their OpenFHE contexts (one per process and preset).

Why these parameters (see `sanitize.py` for the argument): the provider evaluates one ciphertext × plaintext layer and
then *sanitizes* its result (fresh re-encryption of zero + noise flooding), which needs the message at a scale far above
the noise. So: FIXEDMANUAL scaling, ScalingModSize S = 48, FirstModSize 55, multiplicative depth 2 → moduli
q0 (55 bits), q1, q2 (48 bits each); HYBRID key switching with 3 digits (one special prime P of 60 bits). The client
encodes its query at degree 2 (scale 2^96, all three towers); the product with the degree-1 weights (scale 2^48) is
rescaled once to 2 towers at scale 2^96 before the giant steps and the fold, flooded there, and rescaled again: the
client gets one tower (scale 2^48). log2(QP) = 211 ≤ 218, the HE standard's 128-bit bound for ring 8192 (asserted for
every secure preset: `log2_qp`). `san48_55_n16384` is the same chain on ring 16384 (8192 slots, bound 438) for
d > 4096. Values above a preset's headroom decrypt to garbage *without any error*, so the client scales its inputs
into [-1, 1] by a public `input_bound` and every plan scales its weights so that all slots stay inside the headroom.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import threading
from typing import Sequence

import openfhe as fhe

from linalign_jax.errors import LinalignError

# HomomorphicEncryption.org standard, 128-bit classical security, ternary secrets: max log2(QP) per ring dimension.
HE_STANDARD_128_LOG_QP = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclasses.dataclass(frozen=True)
class CkksPreset:
    """One CKKS parameter set (depth 2, HYBRID with 3 digits, FIXEDMANUAL).

    `headroom` bounds |slot value| of every intermediate. A coefficient of the encoded message is at most
    max|slot|·scale, and decryption silently breaks when one exceeds half the modulus: in the worst case (all slots in
    phase) at 2^(55 - 48 - 1) = 64 in the final tower and 2^(151 - 144 - 1) = 64 for the degree-3 product. headroom
    = 32 keeps a factor 2; plans keep their values at headroom / 8, and the Gaussian message flood (coefficient std
    MESSAGE_FLOOD·sqrt(2/N)·scale, i.e. ≤ 1.5·scale at N = 4096) stays well inside the rest.
    """

    name: str
    first_mod_size: int
    scaling_mod_size: int
    security: str  # name of an openfhe SecurityLevel
    ring_dim: int
    headroom: float
    depth: int = 2
    digits: int = 3

    @property
    def slots(self) -> int:
        return self.ring_dim // 2

    @property
    def secure(self) -> bool:
        return self.security != "HEStd_NotSet"

    @property
    def base_scale(self) -> float:
        """The scaling factor Δ = 2^S: a ciphertext of degree d has scale Δ^d."""
        return 2.0 ** self.scaling_mod_size


PRESETS: dict[str, CkksPreset] = {
    p.name: p
    for p in (
        CkksPreset("san48_55", 55, 48, "HEStd_128_classic", 8192, 32.0),
        CkksPreset("san48_55_n16384", 55, 48, "HEStd_128_classic", 16384, 32.0),
        # Tests only: same moduli on a ring too small for any security level; providers refuse it by default.
        CkksPreset("insecure_n4096", 55, 48, "HEStd_NotSet", 4096, 32.0),
    )
}
SECURE_PRESETS = tuple(name for name, p in PRESETS.items() if p.secure)


def get_preset(preset: CkksPreset | str) -> CkksPreset:
    if isinstance(preset, CkksPreset):
        return preset
    if preset not in PRESETS:
        raise LinalignError(f"unknown CKKS preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


AUTO_PRESETS = ("san48_55", "san48_55_n16384")  # what preset=None picks from, smallest ring first


def choose_preset(slots_needed: int) -> CkksPreset:
    """The smallest 128-bit preset whose ring holds `slots_needed` slots."""
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
    params.SetMultiplicativeDepth(preset.depth)
    params.SetScalingModSize(preset.scaling_mod_size)
    params.SetFirstModSize(preset.first_mod_size)
    params.SetSecurityLevel(getattr(fhe, preset.security))
    params.SetScalingTechnique(fhe.ScalingTechnique.FIXEDMANUAL)
    params.SetKeySwitchTechnique(fhe.KeySwitchTechnique.HYBRID)
    params.SetNumLargeDigits(preset.digits)
    params.SetCKKSDataType(fhe.COMPLEX)  # complex plaintexts: the flood covers imaginary parts too
    params.SetRingDim(preset.ring_dim)
    with _CONTEXT_LOCK:
        cc = fhe.GenCryptoContext(params)
        for feature in (fhe.PKE, fhe.KEYSWITCH, fhe.LEVELEDSHE, fhe.ADVANCEDSHE):  # ADVANCEDSHE: EvalAddMany
            cc.Enable(feature)
    if cc.GetRingDimension() != preset.ring_dim:
        raise LinalignError(f"preset {preset.name}: OpenFHE chose ring {cc.GetRingDimension()}, "
                            f"expected {preset.ring_dim}")
    if preset.secure:
        bound = HE_STANDARD_128_LOG_QP[preset.ring_dim]
        if log2_qp(preset, cc) > bound:
            raise LinalignError(f"preset {preset.name}: log2(QP) = {log2_qp(preset, cc):.1f} exceeds the HE "
                                f"standard's 128-bit bound {bound} for ring {preset.ring_dim}")
    return cc


_LOG_QP: dict[str, float] = {}


def log2_qp(preset: CkksPreset | str, cc: fhe.CryptoContext | None = None) -> float:
    """log2 of the full key-switching modulus Q·P, read from the moduli of a throwaway relinearization key (OpenFHE
    does not expose P otherwise); the HE standard bounds this number. Cached per preset (~1 s at ring 8192)."""
    preset = get_preset(preset)
    if preset.name not in _LOG_QP:
        cc = cc or context_for(preset)
        keys = cc.KeyGen()
        cc.EvalMultKeyGen(keys.secretKey)
        text = fhe.SerializeEvalMultKeyString(fhe.JSON, keys.secretKey.GetKeyTag())
        text = re.sub(r"\s", "", text if isinstance(text, str) else text.decode())
        fhe.ClearEvalMultKeys()  # nothing here uses relinearization keys
        moduli = {int(m) for m in re.findall(r'"m":\{"v":(\d+)', text)}
        _LOG_QP[preset.name] = sum(math.log2(m) for m in moduli)
    return _LOG_QP[preset.name]


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
