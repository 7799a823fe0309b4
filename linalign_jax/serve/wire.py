"""The bytes on the wire: one self-describing frame per gRPC message, so no protobuf compiler step is needed.

    frame = b"HLX" | version (1 byte) | header length (u32, big endian) | header (UTF-8 JSON object) | blob bytes

The JSON header says what the message is (`"kind"`) and carries its small fields; `"blobs"` lists the byte lengths
of the binary payloads (serialized ciphertexts, key bundles) that follow it back to back. Decoding checks every
length against the frame, so truncated, padded or garbage bytes are rejected with a message saying what was wrong
instead of reaching OpenFHE's deserializers.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any, Mapping, Sequence

from linalign_jax.errors import LinalignError

MAGIC = b"HLX"
VERSION = 1
MAX_HEADER_BYTES = 1 << 16
_PREFIX = struct.Struct(">3sBI")


class WireError(LinalignError):
    """A frame that does not decode: wrong magic or version, inconsistent lengths, a header that is not a JSON object."""


@dataclasses.dataclass(frozen=True)
class Frame:
    header: dict[str, Any]
    blobs: tuple[bytes, ...] = ()

    @property
    def kind(self) -> str:
        return self.header["kind"]

    def field(self, name: str, kind: type | tuple[type, ...]) -> Any:
        """A required header field of the given type; a missing or mistyped one is a WireError naming it."""
        if name not in self.header:
            raise WireError(f"{self.kind!r} message lacks the header field {name!r}")
        value = self.header[name]
        # bool is an int subclass: a JSON `true` where a count is expected is malformed, not 1.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise WireError(f"{self.kind!r} message field {name!r} = {value!r} is not of type {_names(kind)}")
        return value


def encode(kind: str, fields: Mapping[str, Any] | None = None, blobs: Sequence[bytes] = ()) -> bytes:
    header = {"kind": kind, **(fields or {}), "blobs": [len(b) for b in blobs]}
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"{kind!r} header is {len(raw)} bytes, above the {MAX_HEADER_BYTES}-byte limit")
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(raw)), raw, *map(bytes, blobs)])


def decode(data: bytes, expect: str | Sequence[str] | None = None) -> Frame:
    """Parse and validate one frame; `expect` restricts the accepted kinds."""
    if len(data) < _PREFIX.size:
        raise WireError(f"message of {len(data)} bytes is shorter than the {_PREFIX.size}-byte frame prefix")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"message does not start with the HELIX magic {MAGIC!r} (got {bytes(magic)!r})")
    if version != VERSION:
        raise WireError(f"wire format version {version} is not supported (this side speaks version {VERSION})")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(data):
        raise WireError(f"header length {header_len} exceeds the message ({len(data)} bytes) or the "
                        f"{MAX_HEADER_BYTES}-byte limit")
    start = _PREFIX.size + header_len
    try:
        header = json.loads(bytes(data[_PREFIX.size:start]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"message header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise WireError("message header must be a JSON object with a string 'kind'")
    lengths = header.get("blobs")
    if not isinstance(lengths, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                for n in lengths):
        raise WireError(f"message header 'blobs' must list non-negative byte counts, got {lengths!r}")
    if start + sum(lengths) != len(data):
        raise WireError(f"{header['kind']!r} message declares {sum(lengths)} payload bytes but carries "
                        f"{len(data) - start}")
    kinds = (expect,) if isinstance(expect, str) else expect
    if kinds is not None and header["kind"] not in kinds:
        raise WireError(f"expected a message of kind {' or '.join(map(repr, kinds))}, got {header['kind']!r}")
    blobs, offset = [], start
    view = memoryview(data)
    for n in lengths:
        blobs.append(bytes(view[offset:offset + n]))
        offset += n
    return Frame(header=header, blobs=tuple(blobs))


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))
