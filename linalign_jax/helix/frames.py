"""The one HELIX frame, for engine values and gRPC messages alike: every byte string that crosses the wire is

    b"HLX" | version (1 byte) | header length (u32, big endian) | header (UTF-8 JSON object) | blob bytes

The JSON header says what the frame is (`"kind"`) and carries its small fields; `"blobs"` lists the byte lengths of
the binary payloads (serialized ciphertexts, key material) that follow it back to back. Decoding checks every length
against the frame and bounds the header before parsing it: at most `MAX_HEADER_BYTES`, nesting depth `MAX_DEPTH`,
`MAX_ITEMS` list items / object keys, strings of `MAX_STRING` characters, integers below 2**53, finite numbers only.
So a header cannot make the parser recurse, allocate or loop beyond ~64 KiB of work, and garbage is rejected with a
message saying what was wrong before any payload reaches OpenFHE's deserializers. There is no checksum: it would only
catch corruption that TCP and TLS already catch, and a tampering sender recomputes it.

`Frame.field` / `require` are the one typed-field validator: a required field of the given type (booleans never pass
as integers), or a `WireError` naming the field, its value and the type expected.

Engine view: `frame(kind, header, payload)` and `unframe(data, kind)` wrap a single payload; the integer kinds name
what it holds (a session bundle, a query ciphertext, a result ciphertext).
"""
from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any, Mapping, Sequence

from linalign_jax.errors import LinalignError

MAGIC = b"HLX"
VERSION = 2
MAX_HEADER_BYTES = 1 << 16
MAX_DEPTH, MAX_ITEMS, MAX_STRING, MAX_INT = 6, 4096, 4096, 1 << 53
_PREFIX = struct.Struct(">3sBI")

KIND_BUNDLE, KIND_QUERY, KIND_RESULT = 1, 2, 3
_ENGINE_KINDS = {KIND_BUNDLE: "session_bundle", KIND_QUERY: "query_ciphertext", KIND_RESULT: "result_ciphertext"}


class WireError(LinalignError):
    """Bytes that do not decode as a frame: wrong magic or version, inconsistent lengths, an oversized or
    ill-typed header, a missing or mistyped field."""


@dataclasses.dataclass(frozen=True)
class Frame:
    header: dict[str, Any]
    blobs: tuple[bytes, ...] = ()

    @property
    def kind(self) -> str:
        return self.header["kind"]

    def field(self, name: str, kind: type | tuple[type, ...]) -> Any:
        return require(self.header, name, kind, what=f"{self.kind!r} message")


def require(fields: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str = "message") -> Any:
    """A required field of the given type; a missing or mistyped one is a WireError naming it."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if name not in fields:
        raise WireError(f"{what} lacks the header field {name!r}")
    value = fields[name]
    # bool is an int subclass: a JSON `true` where a count is expected is malformed, not 1. An int is a fine float.
    ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
    if not ok or (isinstance(value, bool) and bool not in kinds):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise WireError(f"{what} field {name!r} = {shown} is not of type {' or '.join(k.__name__ for k in kinds)}")
    return value


def encode(kind: str, fields: Mapping[str, Any] | None = None, blobs: Sequence[bytes] = ()) -> bytes:
    header = {"kind": kind, **(fields or {}), "blobs": [len(b) for b in blobs]}
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"{kind!r} header is {len(raw)} bytes, above the {MAX_HEADER_BYTES}-byte limit")
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(raw)), raw, *map(bytes, blobs)])


def decode(data: bytes, expect: str | Sequence[str] | None = None) -> Frame:
    """Parse and validate one frame; `expect` restricts the accepted kinds."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a frame must be bytes, got {type(data).__name__}")
    if len(data) < _PREFIX.size:
        raise WireError(f"message of {len(data)} bytes is shorter than the {_PREFIX.size}-byte frame prefix")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"message does not start with the HELIX magic {MAGIC!r} (got {bytes(magic)!r})")
    if version != VERSION:
        raise WireError(f"frame format version {version} is not supported (this side speaks version {VERSION})")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(data):
        raise WireError(f"header length {header_len} exceeds the message ({len(data)} bytes) or the "
                        f"{MAX_HEADER_BYTES}-byte limit")
    start = _PREFIX.size + header_len
    header = _parse_header(bytes(data[_PREFIX.size:start]))
    lengths = header["blobs"]
    if start + sum(lengths) != len(data):
        raise WireError(f"{header['kind']!r} message declares {sum(lengths)} payload bytes but carries "
                        f"{len(data) - start}")
    kinds = (expect,) if isinstance(expect, str) else expect
    if kinds is not None and header["kind"] not in kinds:
        raise WireError(f"expected a message of kind {' or '.join(map(repr, kinds))}, got {header['kind']!r}")
    blobs, offset, view = [], start, memoryview(data)
    for n in lengths:
        blobs.append(bytes(view[offset:offset + n]))
        offset += n
    return Frame(header=header, blobs=tuple(blobs))


def frame(kind: int, header: Mapping[str, Any], payload: bytes) -> bytes:
    """An engine value: one payload with its header fields."""
    return encode(_ENGINE_KINDS[kind], header, [payload])


def unframe(data: bytes, kind: int) -> tuple[dict[str, Any], bytes]:
    """(header fields, payload) of an engine value of the expected kind; raise WireError naming what is wrong."""
    name = _ENGINE_KINDS[kind]
    try:
        got = decode(data, name)
    except WireError as e:
        raise WireError(f"{name.replace('_', ' ')}: {e}") from None
    if len(got.blobs) != 1:
        raise WireError(f"{name.replace('_', ' ')}: carries {len(got.blobs)} payloads, expected exactly one")
    header = {k: v for k, v in got.header.items() if k not in ("kind", "blobs")}
    return header, got.blobs[0]


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"message header is not UTF-8 JSON: {str(e)[:120]}") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise WireError("message header must be a JSON object with a string 'kind'")
    _check_bounded(header, depth=1)
    lengths = header.get("blobs")
    if not isinstance(lengths, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                for n in lengths):
        raise WireError(f"message header 'blobs' must list non-negative byte counts, got {str(lengths)[:80]}")
    return header


def _no_constant(name: str) -> None:
    raise WireError(f"message header holds the non-finite number {name}")


def _check_unicode(text: str) -> None:
    """JSON escapes can spell lone surrogates (\\udcff), which no later `.encode()` survives."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError(f"message header has a string that is not valid Unicode ({ascii(text[:20])})") from None


def _check_bounded(value: Any, depth: int) -> None:
    """Reject a header value beyond the frame's bounds (see the module doc): only JSON types, bounded sizes."""
    if depth > MAX_DEPTH:
        raise WireError(f"message header nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        items = value.values()
        if any(len(k) > MAX_STRING for k in value):
            raise WireError(f"message header has a key longer than {MAX_STRING} characters")
        for key in value:
            _check_unicode(key)
    elif isinstance(value, list):
        items = value
    else:
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                raise WireError(f"message header has a string of {len(value)} characters (at most {MAX_STRING})")
            _check_unicode(value)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_INT:
            raise WireError(f"message header has the integer {str(value)[:20]}… beyond ±2**53")
        return
    if len(items) > MAX_ITEMS:
        raise WireError(f"message header has a list or object of {len(items)} items (at most {MAX_ITEMS})")
    for item in items:
        _check_bounded(item, depth + 1)
