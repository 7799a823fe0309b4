"""CKKS layer of HELIX on OpenFHE: parameter presets, contexts, keys, the wire format and the two session roles.

Why these parameters: the provider only evaluates ciphertext × plaintext products (depth 1), so HYBRID key switching
with FLEXIBLEAUTO, ScalingModSize 40 and FirstModSize 50 gives ring 8192 (4096 slots) at 128-bit security; FirstModSize
60 is the next ring (16384, 8192 slots, more headroom), chosen automatically for d > 4096. `hyb_flood` adds OpenFHE's
noise-flooding decryption (opt-in). Values above a preset's headroom decrypt to garbage *without any error*, so the
client scales its inputs into [-1, 1] by a public `input_bound` and every plan scales its weights so that all slots of
every intermediate stay far inside the headroom (see `linear.py`).

OpenFHE keeps rotation keys in one process-global map keyed by the tag of the secret key that made them. A provider
serving many sessions therefore registers each session's keys under its tag (`_KeyRegistry`), restores the other
sessions' keys if a bundle tried to overwrite them, and removes only its own keys when a session closes.

Everything that crosses the wire is a frame: b"HLX1", a kind byte, a JSON header (key tag, shapes, scales) and an
OpenFHE BINARY payload with a CRC-32 of the payload (catches corruption, not tampering: the threat model is
semi-honest). Bad frames raise `LinalignError` naming the problem.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import struct
import threading
import zlib
from typing import Any, Iterator, Sequence

import numpy as np
import openfhe as fhe

from linalign_jax.errors import LinalignError

# ----------------------------------------------------------------------------------------------------------- presets


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
def _canonical_context_bytes(preset: CkksPreset) -> bytes:
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


def _preset_of_context_bytes(cc_bytes: bytes, allowed: Sequence[str]) -> CkksPreset:
    """The allowed preset whose context serializes to exactly `cc_bytes` (OpenFHE's serialization is deterministic).

    Comparing bytes instead of deserializing keeps the client's context bytes away from OpenFHE's parser, which
    crashes the process on some malformed inputs (e.g. zeros) instead of raising.
    """
    for name in allowed:
        if _canonical_context_bytes(PRESETS[name]) == cc_bytes:
            return PRESETS[name]
    raise LinalignError(f"session bundle: the crypto context ({len(cc_bytes)} B) is not the serialization of any "
                        f"allowed preset {list(allowed)} (other ring, moduli or techniques, or malformed)")


# ------------------------------------------------------------------------------------------------------ wire format

_MAGIC = b"HLX1"
_FRAME_HEAD = struct.Struct("<4sBII")  # magic, kind, header length, crc32(payload)
KIND_BUNDLE, KIND_QUERY, KIND_RESULT, KIND_VECTOR = 1, 2, 3, 4
_KIND_NAMES = {KIND_BUNDLE: "session bundle", KIND_QUERY: "query ciphertext", KIND_RESULT: "result ciphertext",
               KIND_VECTOR: "vector ciphertext"}


def frame(kind: int, header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _FRAME_HEAD.pack(_MAGIC, kind, len(head), zlib.crc32(payload)) + head + payload


def unframe(data: bytes, kind: int) -> tuple[dict[str, Any], bytes]:
    """Split and check a frame of the expected kind; raise LinalignError naming what is wrong."""
    what = _KIND_NAMES[kind]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LinalignError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _FRAME_HEAD.size or data[:4] != _MAGIC:
        raise LinalignError(f"{what}: malformed bytes (no HLX1 frame; {len(data)} bytes)")
    _, got_kind, head_len, crc = _FRAME_HEAD.unpack_from(data)
    if got_kind != kind:
        raise LinalignError(f"{what}: got a {_KIND_NAMES.get(got_kind, f'kind {got_kind}')} frame instead")
    head_end = _FRAME_HEAD.size + head_len
    if head_end > len(data):
        raise LinalignError(f"{what}: truncated header ({len(data)} bytes, header ends at {head_end})")
    try:
        header = json.loads(data[_FRAME_HEAD.size:head_end])
    except ValueError as e:
        raise LinalignError(f"{what}: malformed header ({e})") from None
    payload = data[head_end:]
    if zlib.crc32(payload) != crc:
        raise LinalignError(f"{what}: payload checksum mismatch (corrupted or truncated, {len(payload)} bytes)")
    return header, payload


def _deserialize_ciphertext(payload: bytes, what: str) -> fhe.Ciphertext:
    try:
        ct = fhe.DeserializeCiphertextString(payload, fhe.BINARY)
    except RuntimeError as e:
        raise LinalignError(f"{what}: OpenFHE cannot deserialize the ciphertext ({str(e)[-120:]})") from None
    if ct is None:
        raise LinalignError(f"{what}: OpenFHE cannot deserialize the ciphertext (it read no ciphertext)")
    return ct


def check_ciphertext(ct: fhe.Ciphertext, cc: fhe.CryptoContext, key_tag: str, *, level: int, what: str) -> None:
    """Reject a ciphertext that belongs to another context or key, or sits at an unexpected level."""
    ring = ct.GetCryptoContext().GetRingDimension()
    if ring != cc.GetRingDimension():
        raise LinalignError(f"{what}: ring dimension {ring}, expected {cc.GetRingDimension()}")
    if ct.GetCryptoContext() != cc:
        raise LinalignError(f"{what}: ciphertext comes from another crypto context (ring {ring})")
    if ct.GetKeyTag() != key_tag:
        raise LinalignError(f"{what}: encrypted under key {ct.GetKeyTag()[:12]}…, expected this session's key "
                            f"{key_tag[:12]}…")
    if ct.GetLevel() != level or ct.NumberCiphertextElements() != 2:
        raise LinalignError(f"{what}: level {ct.GetLevel()} with {ct.NumberCiphertextElements()} elements, "
                            f"expected level {level} with 2 elements")
    if ct.GetEncodingType() != fhe.CKKS_PACKED_ENCODING or ct.GetSlots() != cc.GetRingDimension() // 2:
        raise LinalignError(f"{what}: not a fully packed CKKS ciphertext ({ct.GetSlots()} slots)")


# ---------------------------------------------------------------------------------------------------- key registry


class _SharedLock:
    """Many readers (evaluations) or one writer (a change of the global key map) at a time."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._readers == 0)
            yield


class _KeyRegistry:
    """Rotation keys of live sessions in OpenFHE's process-global map, one entry per secret-key tag.

    OpenFHE's Python bindings can only clear *all* automorphism keys and silently overwrite keys with the same tag on
    deserialization, so the registry remembers each tag's key map (the first one loaded wins), re-inserts them all after
    every change, and counts users per tag (a client and a provider may share one process, as in tests and benchmarks).
    Changes take the lock exclusively and evaluations share it, so no evaluation sees the map half restored.
    """

    def __init__(self):
        self.lock = _SharedLock()
        self._maps: dict[str, Any] = {}
        self._users: dict[str, int] = {}

    def add_serialized(self, cc: fhe.CryptoContext, key_tag: str, blob: bytes) -> None:
        with self.lock.exclusive():
            if blob:
                try:
                    fhe.DeserializeEvalAutomorphismKeyString(blob, fhe.BINARY)
                except RuntimeError as e:
                    self._restore(cc)
                    raise LinalignError(f"rotation keys: OpenFHE cannot deserialize them ({str(e)[-120:]})") from None
            tags = set(cc.GetAllEvalAutomorphismKeys())
            foreign = tags - set(self._maps) - {key_tag}
            if foreign:
                self._restore(cc)
                raise LinalignError(f"rotation keys carry foreign key tags {sorted(t[:12] for t in foreign)}; "
                                    f"expected only the session tag {key_tag[:12]}…")
            self._register(cc, key_tag, tags)

    def generate(self, cc: fhe.CryptoContext, secret_key: fhe.PrivateKey, rotations: Sequence[int]) -> None:
        """Generate rotation keys into the global map and register them (client side)."""
        with self.lock.exclusive():
            if rotations:
                cc.EvalRotateKeyGen(secret_key, list(rotations))
            self._register(cc, secret_key.GetKeyTag(), set(cc.GetAllEvalAutomorphismKeys()))

    def remove(self, cc: fhe.CryptoContext, key_tag: str) -> None:
        with self.lock.exclusive():
            if key_tag not in self._users:
                return
            self._users[key_tag] -= 1
            if not self._users[key_tag]:
                del self._users[key_tag], self._maps[key_tag]
                self._restore(cc)

    def _register(self, cc: fhe.CryptoContext, key_tag: str, tags: set[str]) -> None:
        if key_tag not in self._maps:
            self._maps[key_tag] = cc.GetEvalAutomorphismKeyMap(key_tag) if key_tag in tags else None
        self._users[key_tag] = self._users.get(key_tag, 0) + 1
        self._restore(cc)

    def _restore(self, cc: fhe.CryptoContext) -> None:
        cc.ClearEvalAutomorphismKeys()
        for tag, key_map in self._maps.items():
            if key_map is not None:
                cc.InsertEvalAutomorphismKey(key_map, tag)


KEYS = _KeyRegistry()


def automorphism_indices(cc: fhe.CryptoContext, rotations: Sequence[int]) -> set[int]:
    return {cc.FindAutomorphismIndex(int(r)) for r in rotations}


# ------------------------------------------------------------------------------------------------------- encoding


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


def random_uniform(n: int, bound: float) -> np.ndarray:
    """`n` values uniform in [-bound, bound] from the OS CSPRNG (flooding masks must be unpredictable to the client)."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)  # 53 random bits each
    return (words.astype(np.float64) / float(1 << 53) * 2.0 - 1.0) * bound


# ------------------------------------------------------------------------------------------------------- sessions


class ClientSession:
    """The client of one inference session: fresh key pair, rotation keys for exactly one layout, the secret key.

    `layout` is a `linear.LinearLayout` or `bulk.BulkLayout` (which names the preset); it is computed from public
    shapes only, so the client generates exactly the rotation keys the provider's plan will use. `input_bound` is
    public: every input entry must satisfy |x| <= input_bound (checked), and the ciphertexts carry x / input_bound.
    Create one session per inference session: keys are fresh each time (paper §3.3).
    """

    def __init__(self, preset: CkksPreset, layout, input_bound: float, cc: fhe.CryptoContext, keys: fhe.KeyPair):
        self.preset, self.layout, self.input_bound = preset, layout, float(input_bound)
        self._cc, self._keys = cc, keys
        self.key_tag: str = keys.secretKey.GetKeyTag()
        self._closed = False

    @classmethod
    def create(cls, layout, input_bound: float) -> "ClientSession":
        """Key generation for one session on the layout's preset, with exactly the layout's rotation keys."""
        if not (np.isfinite(input_bound) and input_bound > 0):
            raise LinalignError(f"input_bound must be a positive finite number, got {input_bound!r}")
        preset = get_preset(layout.preset)
        cc = context_for(preset)
        keys = cc.KeyGen()
        KEYS.generate(cc, keys.secretKey, layout.rotation_indices())
        return cls(preset, layout, input_bound, cc, keys)

    def bundle(self) -> bytes:
        """Context + public key + rotation keys + public session metadata, as one frame for the provider."""
        parts = [fhe.Serialize(self._cc, fhe.BINARY), fhe.Serialize(self._keys.publicKey, fhe.BINARY),
                 fhe.SerializeEvalAutomorphismKeyString(fhe.BINARY, self.key_tag)
                 if self.layout.rotation_indices() else b""]
        header = {"preset": self.preset.name, "layout": self.layout.to_json(), "input_bound": self.input_bound,
                  "key_tag": self.key_tag, "part_sizes": [len(p) for p in parts]}
        return frame(KIND_BUNDLE, header, b"".join(parts))

    # -- linear layouts: one ciphertext per message

    def encrypt(self, x: np.ndarray) -> bytes:
        """Encrypt one query x [d_in] (or up to `layout.queries_per_ciphertext` queries [m, d_in]) in one ciphertext."""
        if self.layout.kind != "linear":
            raise LinalignError(f"encrypt() needs a linear layout; this session's layout is {self.layout.kind!r}")
        x = np.asarray(x, dtype=np.float64)
        queries = x[None] if x.ndim == 1 else x
        if queries.ndim != 2 or queries.shape[1] != self.layout.d_in:
            raise LinalignError(f"query shape {x.shape}, expected [{self.layout.d_in}] or [m, {self.layout.d_in}]")
        if not 1 <= len(queries) <= self.layout.queries_per_ciphertext:
            raise LinalignError(f"{len(queries)} queries in one ciphertext; this layout holds 1.."
                                f"{self.layout.queries_per_ciphertext}")
        scaled = check_finite_bounded(queries, self.input_bound, "query embedding") / self.input_bound
        slots = self.layout.pack_queries(scaled)
        ct = self._cc.Encrypt(self._keys.publicKey, self._cc.MakeCKKSPackedPlaintext(slots))
        header = {"key_tag": self.key_tag, "n": len(queries), "single": x.ndim == 1}
        return frame(KIND_QUERY, header, fhe.Serialize(ct, fhe.BINARY))

    def decrypt(self, result: bytes) -> np.ndarray:
        """Decrypt a provider result into outputs [d_out] (or [m, d_out]), undoing the input and weight scaling."""
        header, values = self._decrypt_result(result)
        outputs = self.layout.unpack_outputs(values, int(header["n"])) * float(header["output_scale"])
        return outputs[0] if header.get("single") else outputs

    # -- bulk (feature-major) layouts: one ciphertext per feature, one result ciphertext per output

    def encrypt_bulk(self, x: np.ndarray, start: int = 0, stop: int | None = None) -> list[bytes]:
        """Encrypt a batch x [n, d_in] (n <= slots) feature-major: frame j holds x[:, j], for j in [start, stop).

        A range lets the client encrypt and stream the features in chunks; the provider takes all d_in frames in order.
        """
        if self.layout.kind != "bulk":
            raise LinalignError(f"encrypt_bulk() needs a bulk layout; this session's layout is {self.layout.kind!r}")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.layout.d_in or not 1 <= len(x) <= self.preset.slots:
            raise LinalignError(f"bulk batch shape {x.shape}, expected [n, {self.layout.d_in}] with "
                                f"1 <= n <= {self.preset.slots}")
        stop = x.shape[1] if stop is None else stop
        if not 0 <= start < stop <= x.shape[1]:
            raise LinalignError(f"feature range [{start}, {stop}) outside [0, {x.shape[1]})")
        scaled = check_finite_bounded(x[:, start:stop], self.input_bound, "bulk embeddings") / self.input_bound
        header = {"key_tag": self.key_tag, "n": len(x)}
        return [frame(KIND_QUERY, dict(header, feature=start + j),
                      fhe.Serialize(self._cc.Encrypt(self._keys.publicKey,
                                                     self._cc.MakeCKKSPackedPlaintext(scaled[:, j])), fhe.BINARY))
                for j in range(stop - start)]

    def decrypt_bulk(self, results: Sequence[bytes]) -> np.ndarray:
        """Decrypt the d_out result frames of `ProviderSession.evaluate_bulk` into outputs [n, d_out]."""
        if len(results) != self.layout.d_out:
            raise LinalignError(f"{len(results)} bulk result frames, expected d_out={self.layout.d_out}")
        columns = []
        for j, blob in enumerate(results):
            header, values = self._decrypt_result(blob)
            if header.get("output") != j:
                raise LinalignError(f"bulk result frame {j} holds output {header.get('output')}")
            columns.append(values[: int(header["n"])] * float(header["output_scale"]))
        return np.stack(columns, axis=1)

    # -- raw slot vectors (secure fit): no scaling, only the headroom check

    def encrypt_vector(self, values: np.ndarray, bound: float = 1.0) -> bytes:
        """Encrypt a raw slot vector (length <= slots). |values| <= bound is checked; keep products within headroom."""
        values = check_finite_bounded(np.ravel(values), bound, "vector")
        if len(values) > self.preset.slots:
            raise LinalignError(f"vector of length {len(values)} exceeds {self.preset.slots} slots")
        ct = self._cc.Encrypt(self._keys.publicKey, self._cc.MakeCKKSPackedPlaintext(values))
        return frame(KIND_VECTOR, {"key_tag": self.key_tag, "n": len(values)}, fhe.Serialize(ct, fhe.BINARY))

    def decrypt_vector(self, blob: bytes, length: int | None = None) -> np.ndarray:
        """Decrypt a vector frame (from `encrypt_vector` or `ProviderSession.dump_ciphertext`) into `length` slots."""
        header, payload = unframe(blob, KIND_VECTOR)
        ct = self._load_own(header, payload, "vector ciphertext", levels=(0, 1))
        return decode(self._cc.Decrypt(ct, self._keys.secretKey), self.preset.slots if length is None else length)

    def close(self) -> None:
        """Drop this session's rotation keys from the process-global map (the secret key dies with the object)."""
        if not self._closed:
            KEYS.remove(self._cc, self.key_tag)
            self._closed = True

    def __enter__(self) -> "ClientSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decrypt_result(self, blob: bytes) -> tuple[dict[str, Any], np.ndarray]:
        header, payload = unframe(blob, KIND_RESULT)
        ct = self._load_own(header, payload, "result ciphertext", levels=(1,))
        values = decode(self._cc.Decrypt(ct, self._keys.secretKey), self.preset.slots)
        if not np.isfinite(values).all() or np.abs(values).max() > self.preset.headroom:
            raise LinalignError(f"result ciphertext decrypts to |value| {np.abs(values).max():.3g} beyond the "
                                f"headroom {self.preset.headroom:.3g}: the provider's scaling is wrong")
        return header, values

    def _load_own(self, header: dict, payload: bytes, what: str, levels: Sequence[int]) -> fhe.Ciphertext:
        if header.get("key_tag") != self.key_tag:
            raise LinalignError(f"{what}: made for key {str(header.get('key_tag'))[:12]}…, not this session's key")
        ct = _deserialize_ciphertext(payload, what)
        level = ct.GetLevel() if ct.GetLevel() in levels else levels[0]
        check_ciphertext(ct, self._cc, self.key_tag, level=level, what=what)
        return ct


class ProviderSession:
    """The provider's view of one client session: the client's context, public key and rotation keys (by key tag).

    `load` validates everything in the bundle; `evaluate` runs a `linear.LinearPlan` built for the same layout and
    preset, `evaluate_bulk` a `bulk.BulkPlan`. The generic helpers expose ciphertext × plaintext algebra for protocols
    that choose their own packing (secure fit).
    """

    def __init__(self, preset: CkksPreset, layout_json: dict, input_bound: float, cc: fhe.CryptoContext,
                 public_key: fhe.PublicKey, key_tag: str):
        self.preset, self.layout_json, self.input_bound = preset, layout_json, input_bound
        self.cc, self.public_key, self.key_tag = cc, public_key, key_tag
        self._closed = False
        # OpenFHE re-encodes the plaintext in every EvalMult on a *deserialized* ciphertext (5x slower, measured);
        # anything added onto a locally made ciphertext takes that one's native parameters, so queries are added onto
        # this encryption of zero first.
        self._native_zero = cc.Encrypt(public_key, cc.MakeCKKSPackedPlaintext(np.zeros(preset.slots)))

    @classmethod
    def load(cls, bundle: bytes, allowed_presets: Sequence[str] = SECURE_PRESETS) -> "ProviderSession":
        """Deserialize and validate a client bundle: frame, preset (ring/moduli), key tags, rotation key coverage."""
        header, payload = unframe(bundle, KIND_BUNDLE)
        try:
            sizes = [int(s) for s in header["part_sizes"]]
            preset_name, layout_json = str(header["preset"]), dict(header["layout"])
            input_bound, key_tag = float(header["input_bound"]), str(header["key_tag"])
        except (KeyError, TypeError, ValueError) as e:
            raise LinalignError(f"session bundle: header field missing or malformed ({e!r})") from None
        if len(sizes) != 3 or sum(sizes) != len(payload) or min(sizes) < 0:
            raise LinalignError(f"session bundle: part sizes {sizes} do not add up to the payload ({len(payload)} B)")
        if preset_name not in allowed_presets:
            raise LinalignError(f"session bundle: preset {preset_name!r} not allowed here; expected one of "
                                f"{list(allowed_presets)}")
        if not (np.isfinite(input_bound) and input_bound > 0):
            raise LinalignError(f"session bundle: input_bound {input_bound!r} is not a positive finite number")
        cc_bytes, pk_bytes, rk_bytes = (payload[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(3))
        preset = _preset_of_context_bytes(cc_bytes, allowed_presets)
        cc = context_for(preset)
        if preset.name != preset_name:
            raise LinalignError(f"session bundle: context is preset {preset.name}, header says {preset_name}")
        try:
            public_key = fhe.DeserializePublicKeyString(pk_bytes, fhe.BINARY)
        except RuntimeError as e:
            raise LinalignError(f"session bundle: malformed public key ({str(e)[-120:]})") from None
        if public_key is None:
            raise LinalignError("session bundle: malformed public key (OpenFHE read no key)")
        if public_key.GetKeyTag() != key_tag:
            raise LinalignError(f"session bundle: public key tag {public_key.GetKeyTag()[:12]}… differs from the "
                                f"header's {key_tag[:12]}…")
        KEYS.add_serialized(cc, key_tag, rk_bytes)
        return cls(preset, layout_json, input_bound, cc, public_key, key_tag)

    def require_rotations(self, rotations: Sequence[int]) -> None:
        """Raise naming the rotation indices whose keys this session lacks."""
        have = set(self.cc.GetExistingEvalAutomorphismKeyIndices(self.key_tag))
        missing = sorted(r for r in rotations if self.cc.FindAutomorphismIndex(int(r)) not in have)
        if missing:
            raise LinalignError(f"session {self.key_tag[:12]}… lacks rotation keys for indices {missing}")

    def evaluate(self, plan, query: bytes) -> bytes:
        """Evaluate a `LinearPlan` on one query frame; returns a result frame holding one 1-tower ciphertext.

        Holds the key registry's shared lock throughout, so no key-map change (another session loading or closing)
        can interleave with the rotations."""
        header, payload = unframe(query, KIND_QUERY)
        with KEYS.lock.shared():
            self._check_plan(plan)
            ct = self._load(header, payload, "query ciphertext", level=0)
            n = int(header.get("n", 1))
            if not 1 <= n <= plan.layout.queries_per_ciphertext:
                raise LinalignError(f"query frame claims {n} queries; the layout holds "
                                    f"1..{plan.layout.queries_per_ciphertext}")
            result, output_scale = plan.apply(self.cc, ct, self.input_bound, n)
        out_header = {"key_tag": self.key_tag, "n": n, "single": bool(header.get("single", False)),
                      "output_scale": output_scale}
        return frame(KIND_RESULT, out_header, fhe.Serialize(result, fhe.BINARY))

    def evaluate_bulk(self, plan, queries: Sequence[bytes], chunk: int = 256) -> list[bytes]:
        """Evaluate a `BulkPlan` on the d_in feature frames of `ClientSession.encrypt_bulk`; one frame per output.

        Frames are deserialized `chunk` at a time, so memory stays bounded for large d_in."""
        with KEYS.lock.shared():
            self._check_plan(plan)
        if len(queries) != plan.layout.d_in:
            raise LinalignError(f"{len(queries)} bulk feature frames, expected d_in={plan.layout.d_in}")
        n = int(unframe(queries[0], KIND_QUERY)[0].get("n", 0))

        def load(j: int, blob: bytes) -> fhe.Ciphertext:
            header, payload = unframe(blob, KIND_QUERY)
            if header.get("feature") != j:
                raise LinalignError(f"bulk frame {j} holds feature {header.get('feature')}")
            if header.get("n") != n:
                raise LinalignError(f"bulk frame {j} holds {header.get('n')} queries, frame 0 holds {n}")
            return self._load(header, payload, f"bulk feature {j} ciphertext", level=0)

        chunks = ([load(j, queries[j]) for j in range(start, min(start + chunk, len(queries)))]
                  for start in range(0, len(queries), chunk))
        results, output_scale = plan.apply(self.cc, chunks, self.input_bound, n)
        return [frame(KIND_RESULT, {"key_tag": self.key_tag, "n": n, "output": j, "output_scale": output_scale},
                      fhe.Serialize(ct, fhe.BINARY)) for j, ct in enumerate(results)]

    # -- generic ciphertext × plaintext algebra (secure fit)

    def load_ciphertext(self, blob: bytes) -> fhe.Ciphertext:
        """A fresh vector ciphertext of this session (from `ClientSession.encrypt_vector`), validated."""
        header, payload = unframe(blob, KIND_VECTOR)
        return self._load(header, payload, "vector ciphertext", level=0)

    def multiply_plain(self, ct: fhe.Ciphertext, values: np.ndarray) -> fhe.Ciphertext:
        """ct ⊙ values (slot-wise; values shorter than the ring are zero-padded). Uses the single level of depth."""
        values = check_finite_bounded(np.ravel(values), self.preset.headroom, "plaintext vector")
        return self.cc.EvalMult(ct, self.cc.MakeCKKSPackedPlaintext(values))

    def linear_sum(self, cts: Sequence[fhe.Ciphertext], weights: Sequence[float]) -> fhe.Ciphertext:
        """Σ_i weights[i] · cts[i] with scalar weights (EvalLinearWSum; fresh inputs, one level)."""
        weights = check_finite_bounded(np.asarray(weights), self.preset.headroom, "weights")
        if len(weights) != len(cts) or not cts:
            raise LinalignError(f"{len(cts)} ciphertexts and {len(weights)} weights; expected equal, non-zero")
        return self.cc.EvalLinearWSum(list(cts), [float(w) for w in weights])

    def add(self, a: fhe.Ciphertext, b: fhe.Ciphertext) -> fhe.Ciphertext:
        return self.cc.EvalAdd(a, b)

    def dump_ciphertext(self, ct: fhe.Ciphertext, compress: bool = True) -> bytes:
        """Serialize a ciphertext as a vector frame for the client, compressed to one tower by default."""
        if compress and ct.GetLevel() == 0:
            ct = self.cc.Compress(ct, 1)
        return frame(KIND_VECTOR, {"key_tag": self.key_tag}, fhe.Serialize(ct, fhe.BINARY))

    def close(self) -> None:
        """Remove this session's rotation keys from the process-global map; other sessions keep theirs."""
        if not self._closed:
            KEYS.remove(self.cc, self.key_tag)
            self._closed = True

    def __enter__(self) -> "ProviderSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_plan(self, plan) -> None:
        if self._closed:
            raise LinalignError(f"session {self.key_tag[:12]}… is closed")
        if plan.preset.name != self.preset.name:
            raise LinalignError(f"plan encoded for preset {plan.preset.name}, session uses {self.preset.name}")
        if plan.layout.to_json() != self.layout_json:
            raise LinalignError(f"plan layout {plan.layout.to_json()} differs from the session's {self.layout_json}")
        self.require_rotations(plan.layout.rotation_indices())

    def _load(self, header: dict, payload: bytes, what: str, level: int) -> fhe.Ciphertext:
        if header.get("key_tag") != self.key_tag:
            raise LinalignError(f"{what}: made for key {str(header.get('key_tag'))[:12]}…, not this session's key "
                                f"{self.key_tag[:12]}…")
        ct = _deserialize_ciphertext(payload, what)
        check_ciphertext(ct, self.cc, self.key_tag, level=level, what=what)
        return self.cc.EvalAdd(self._native_zero, ct)
