"""Structural validation of a client's key material and ciphertexts before OpenFHE parses a byte of them.

OpenFHE's deserializers trust their input: a malformed public key, rotation key or ciphertext can abort the process,
segfault later in `Encrypt`/`EvalAdd`, or make it allocate gigabytes from a length field (helix_security.md §3). What
makes a strict check possible: for a fixed preset and layout, OpenFHE's BINARY serialization of an honest object is
byte-for-byte the same except for (a) the key tag, a fixed-length string, and (b) the coefficient words of its RNS
polynomials, each stored as `u64 N | N × u64 word | u64 modulus` (measured on OpenFHE 1.6). So a `Template` built from
two honest samples (made here with the client's own code, whatever encoding it uses) records
- every polynomial array: its offset, N and modulus q (located structurally: the length field N, N words that differ
  between the two samples, then a modulus > every word of both samples);
- every occurrence of the key tag;
- and everything else as constant bytes: headers, lengths, parameters, levels, scaling factors and the embedded
  crypto context, which therefore equals the session's own.
An incoming blob must have the template's length, its constant bytes, the session's tag at every tag position, and
every coefficient word < its modulus. Anything else is refused with the first offending offset, so no length field,
parameter or context a client chooses ever reaches OpenFHE; a blob that passes is an honest object with other
coefficients. The two samples must agree outside (a) and (b), or building the template fails loudly.

Templates are cached per (preset, layout): building one costs two key generations for that layout.

Ciphertexts travel *packed* (`Template.pack`): only their coefficient words, each in bit_length(q) bits (55/48/48 at
ring 8192: 151 of 192 bits), the rest being the template's; the receiver rebuilds the OpenFHE bytes from its own
template (`Template.unpack`), so a client's query can hold nothing but coefficients below their moduli.
"""
from __future__ import annotations

import collections
import dataclasses
import struct
import threading
from typing import Any

import numpy as np
import openfhe as fhe

from linalign_jax.errors import LinalignError

_U64 = struct.Struct("<Q")
_TEMPLATE_CACHE = 8
_sandbox = None  # a sandbox.Sandbox once `use_sandbox` is called (providers); None: template checks only


@dataclasses.dataclass(frozen=True)
class Template:
    """The fixed structure of one kind of serialized object (see the module doc)."""

    what: str
    reference: bytes
    constant: tuple[tuple[int, int], ...]  # [start, stop) byte ranges that must equal `reference`
    arrays: tuple[tuple[int, int, int], ...]  # (offset of the first word, N, modulus)
    tags: tuple[int, ...]  # offsets of the key tag
    tag_length: int

    @classmethod
    def build(cls, what: str, a: bytes, b: bytes, tag_a: str, tag_b: str, ring_dim: int) -> "Template":
        if len(a) != len(b):
            raise LinalignError(f"{what}: two honest samples serialize to {len(a)} and {len(b)} bytes; this OpenFHE "
                                f"build's format is not fixed per layout, so it cannot be validated")
        ta, tb = tag_a.encode(), tag_b.encode()
        if len(ta) != len(tb):
            raise LinalignError(f"{what}: key tags of different lengths ({len(ta)}, {len(tb)})")
        tags = _occurrences(a, ta) if ta else []
        if tags != (_occurrences(b, tb) if tb else []):
            raise LinalignError(f"{what}: the key tag sits at different offsets in two honest samples")
        arrays = _arrays(a, b, ring_dim)
        variable = sorted([(p, p + len(ta)) for p in tags] + [(o, o + 8 * n) for o, n, _ in arrays])
        constant, start = [], 0
        for lo, hi in variable:
            if lo > start:
                constant.append((start, lo))
            start = max(start, hi)
        if start < len(a):
            constant.append((start, len(a)))
        for lo, hi in constant:
            if a[lo:hi] != b[lo:hi]:
                first = lo + next(i for i in range(hi - lo) if a[lo + i] != b[lo + i])
                raise LinalignError(f"{what}: two honest samples differ at byte {first}, outside every key tag and "
                                    f"coefficient array; this OpenFHE build's format is not understood here")
        return cls(what, bytes(a), tuple(constant), tuple(arrays), tuple(tags), len(ta))

    @property
    def packed_size(self) -> int:
        """Bytes of `pack`'s output: every array's words at bit_length(modulus) bits, each array byte-aligned."""
        return sum(-(-n * q.bit_length() // 8) for _, n, q in self.arrays)

    def pack(self, data: bytes) -> bytes:
        """The coefficient words of an object with this template's structure, bit-packed (see the module doc)."""
        parts = []
        for offset, n, modulus in self.arrays:
            words = np.frombuffer(data, dtype=np.uint8, count=8 * n, offset=offset)  # little-endian u64s
            bits = np.unpackbits(words, bitorder="little").reshape(n, 64)[:, : modulus.bit_length()]
            parts.append(np.packbits(bits, bitorder="little").tobytes())
        return b"".join(parts)

    def unpack(self, packed: bytes, key_tag: str, what: str | None = None) -> bytes:
        """The OpenFHE bytes of a packed object: this template with `key_tag` and the packed words, or LinalignError
        (wrong length, nonzero padding bits, a word not below its modulus)."""
        what = what or self.what
        if not isinstance(packed, (bytes, bytearray)) or len(packed) != self.packed_size:
            size = len(packed) if isinstance(packed, (bytes, bytearray)) else type(packed).__name__
            raise LinalignError(f"{what}: {size} packed bytes, but an honest one of this session is exactly "
                                f"{self.packed_size} (another preset, layout or level, or a forged length)")
        tag = key_tag.encode()
        if len(tag) != self.tag_length:
            raise LinalignError(f"{what}: session key tag of {len(tag)} characters, expected {self.tag_length}")
        out, start = bytearray(self.reference), 0
        for p in self.tags:
            out[p:p + len(tag)] = tag
        for i, (offset, n, modulus) in enumerate(self.arrays):
            width = modulus.bit_length()
            size = -(-n * width // 8)
            bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8, count=size, offset=start), bitorder="little")
            start += size
            if bits[n * width:].any():
                raise LinalignError(f"{what}: nonzero padding bits after polynomial {i}")
            full = np.zeros((n, 64), dtype=np.uint8)
            full[:, :width] = bits[: n * width].reshape(n, width)
            words = np.packbits(full, bitorder="little").view("<u8")
            if int(words.max()) >= modulus:
                j = int(np.argmax(words >= np.uint64(modulus)))
                raise LinalignError(f"{what}: coefficient {j} of polynomial {i} is not below its modulus {modulus}")
            out[offset:offset + 8 * n] = words.tobytes()
        return bytes(out)

    def check(self, data: bytes, key_tag: str, what: str | None = None) -> None:
        """Raise LinalignError naming the first difference from an honest object of this session (messages start
        with `what`, default the template's own name)."""
        try:
            self._check(data, key_tag)
        except LinalignError as e:
            if what is None:
                raise
            raise LinalignError(f"{what}{str(e)[len(self.what):]}") from None

    def _check(self, data: bytes, key_tag: str) -> None:
        if not isinstance(data, (bytes, bytearray)):
            raise LinalignError(f"{self.what}: expected bytes, got {type(data).__name__}")
        if len(data) != len(self.reference):
            raise LinalignError(f"{self.what}: {len(data)} bytes, but an honest one of this session is exactly "
                                f"{len(self.reference)} bytes (another preset, layout or level; missing or extra "
                                f"keys; or a forged length)")
        for lo, hi in self.constant:
            if data[lo:hi] != self.reference[lo:hi]:
                first = lo + next(i for i in range(hi - lo) if data[lo + i] != self.reference[lo + i])
                raise LinalignError(f"{self.what}: byte {first} differs from this session's structure (headers, "
                                    f"lengths, parameters and the embedded crypto context are fixed per preset and "
                                    f"layout)")
        tag = key_tag.encode()
        if len(tag) != self.tag_length:
            raise LinalignError(f"{self.what}: session key tag of {len(tag)} characters, expected {self.tag_length}")
        for p in self.tags:
            if data[p:p + len(tag)] != tag:
                raise LinalignError(f"{self.what}: the key tag at byte {p} is not this session's tag {key_tag[:12]}…")
        for i, (offset, n, modulus) in enumerate(self.arrays):
            words = np.frombuffer(data, dtype="<u8", count=n, offset=offset)
            if int(words.max()) >= modulus:
                j = int(np.argmax(words >= np.uint64(modulus)))
                raise LinalignError(f"{self.what}: coefficient {j} of polynomial {i} (byte {offset + 8 * j}) is "
                                    f"not below its modulus {modulus}")


def _occurrences(data: bytes, needle: bytes) -> list[int]:
    found, start = [], data.find(needle)
    while start >= 0:
        found.append(start)
        start = data.find(needle, start + len(needle))
    return found


def _arrays(a: bytes, b: bytes, n: int) -> list[tuple[int, int, int]]:
    """(first word offset, n, modulus) of every coefficient array: a u64 length n, n words that differ between the
    samples (fresh randomness), then a u64 modulus above every word of both."""
    marker = _U64.pack(n)
    found, p = [], a.find(marker)
    while 0 <= p <= len(a) - 8 * (n + 2):
        start, stop = p + 8, p + 8 + 8 * n
        if a[p:p + 8] == b[p:p + 8]:
            wa = np.frombuffer(a, dtype="<u8", count=n, offset=start)
            wb = np.frombuffer(b, dtype="<u8", count=n, offset=start)
            modulus = _U64.unpack_from(a, stop)[0]
            if (modulus == _U64.unpack_from(b, stop)[0] and modulus % 2 == 1 and modulus > 1 << 20
                    and int(wa.max()) < modulus and int(wb.max()) < modulus and (wa != wb).mean() > 0.9):
                found.append((start, n, int(modulus)))
                p = a.find(marker, stop + 8)
                continue
        p = a.find(marker, p + 1)
    if not found:
        raise LinalignError(f"no coefficient arrays of length {n} found in an honest sample")
    return found


# ---------------------------------------------------------------------------------------------- per-layout templates


@dataclasses.dataclass(frozen=True)
class SessionTemplates:
    """What an honest client of one (preset, layout) sends: public key, rotation keys, a query ciphertext."""

    public_key: Template
    rotation_keys: Template | None  # None: the layout needs no rotation keys (the blob must be empty)
    ciphertext: Template

    @property
    def largest_bytes(self) -> int:
        return max(len(t.reference) for t in (self.public_key, self.rotation_keys, self.ciphertext) if t)


_cache: collections.OrderedDict[tuple[str, str], SessionTemplates] = collections.OrderedDict()
_cache_lock = threading.Lock()


def templates_for(layout) -> SessionTemplates:
    """The templates of `layout` (a LinearLayout or BulkLayout naming its preset), built once from two honest client
    sessions and cached (at most a few layouts)."""
    key = (layout.preset, repr(sorted(layout.to_json().items())))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        built = _build(layout)
        _cache[key] = built
        while len(_cache) > _TEMPLATE_CACHE:
            _cache.popitem(last=False)
        return built


def _build(layout) -> SessionTemplates:
    from linalign_jax.helix.frames import KIND_BUNDLE, unframe
    from linalign_jax.helix.sessions import ClientSession

    samples = []
    for _ in range(2):
        with ClientSession.create(layout, 1.0) as client:
            header, payload = unframe(client.bundle(), KIND_BUNDLE)
            sizes = header["part_sizes"]
            pk = payload[sizes[0]:sizes[0] + sizes[1]]
            rk = payload[sizes[0] + sizes[1]:]
            samples.append((client.key_tag, pk, rk, client.ciphertext_template.reference))
    (tag_a, pk_a, rk_a, ct_a), (tag_b, pk_b, rk_b, ct_b) = samples
    ring = _ring_dim(layout)
    return SessionTemplates(
        public_key=Template.build("public key", pk_a, pk_b, tag_a, tag_b, ring),
        rotation_keys=Template.build("rotation keys", rk_a, rk_b, tag_a, tag_b, ring) if rk_a else None,
        ciphertext=Template.build("ciphertext", ct_a, ct_b, tag_a, tag_b, ring))


def _ring_dim(layout) -> int:
    from linalign_jax.helix.presets import get_preset

    return get_preset(layout.preset).ring_dim


# ------------------------------------------------------------------------------------------------- entry points


def use_sandbox(sandbox) -> None:
    """Also parse and exercise every bundle's key material in `sandbox` (a `sandbox.Sandbox`; None switches it off)
    after its template check: defence in depth for a provider."""
    global _sandbox
    _sandbox = sandbox
    if sandbox is not None:
        sandbox.start()  # its worker imports OpenFHE now, not during the first client's bundle


def layout_from_json(fields: dict):
    """A LinearLayout or BulkLayout from its `to_json()` (validated by the layout's own constructor)."""
    from linalign_jax.helix.bulk import BulkLayout
    from linalign_jax.helix.linear import LinearLayout

    cls = {"linear": LinearLayout, "bulk": BulkLayout}.get(fields.get("kind"))
    if cls is None:
        raise LinalignError(f"session bundle: layout kind {str(fields.get('kind'))[:20]!r} is neither 'linear' nor "
                            f"'bulk'")
    try:
        return cls(**fields)
    except TypeError as e:
        raise LinalignError(f"session bundle: malformed layout ({e})") from None


def check_key_material(layout, key_tag: str, public_key: bytes, rotation_keys: bytes) -> SessionTemplates:
    """Refuse a bundle's public and rotation keys unless they are honest objects of this layout and tag; returns the
    layout's templates (the session keeps them to check its ciphertexts)."""
    templates = templates_for(layout)
    templates.public_key.check(public_key, key_tag)
    if templates.rotation_keys is None:
        if rotation_keys:
            raise LinalignError(f"rotation keys: {len(rotation_keys)} bytes, but this layout needs none")
    else:
        templates.rotation_keys.check(rotation_keys, key_tag)
    if _sandbox is not None:
        _sandbox.check(layout.preset, layout.rotation_indices(), key_tag, public_key, rotation_keys)
    return templates


def openfhe_parse(parse, data: bytes, what: str) -> Any:
    """`parse(data, BINARY)` with OpenFHE's exceptions (and its silent None) turned into a LinalignError naming `what`
    (for bytes a template has already checked, or that come from the provider)."""
    try:
        parsed = parse(data, fhe.BINARY)
    except RuntimeError as e:
        raise LinalignError(f"{what}: OpenFHE cannot deserialize it ({str(e)[-120:]})") from None
    if parsed is None:
        raise LinalignError(f"{what}: OpenFHE read nothing from {len(data)} bytes")
    return parsed


def parse_public_key(data: bytes) -> Any:
    """OpenFHE's parse of checked public-key bytes (`check_key_material` first)."""
    return openfhe_parse(fhe.DeserializePublicKeyString, data, "session bundle: public key")


def parse_ciphertext(template: Template, packed: bytes, key_tag: str, what: str) -> Any:
    """A client's packed ciphertext rebuilt from its session's template (kept by the session: never built during an
    evaluation, which holds the key lock a build needs), then parsed by OpenFHE. The rebuilt bytes are an honest
    object by construction (the template's constant bytes and tags, words checked below their moduli), so
    `Template.check` would find nothing."""
    return deserialize_ciphertext(template.unpack(packed, key_tag, what), what)


def deserialize_ciphertext(data: bytes, what: str) -> Any:
    """OpenFHE's parse of ciphertext bytes with its errors named (bytes already checked, or from a provider)."""
    return openfhe_parse(fhe.DeserializeCiphertextString, data, what)
