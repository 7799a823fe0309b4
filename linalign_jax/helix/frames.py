"""The HELIX frame: every value that crosses the wire is b"HLX1", a kind byte, a JSON header (key tag, shapes,
scales) and an OpenFHE BINARY payload with a CRC-32 of the payload (catches corruption, not tampering). Bad frames
raise `LinalignError` naming the problem. Owned by the transport engineer (one format for engine and wire)."""
from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from linalign_jax.errors import LinalignError

_MAGIC = b"HLX1"
_FRAME_HEAD = struct.Struct("<4sBII")  # magic, kind, header length, crc32(payload)
KIND_BUNDLE, KIND_QUERY, KIND_RESULT = 1, 2, 3
_KIND_NAMES = {KIND_BUNDLE: "session bundle", KIND_QUERY: "query ciphertext", KIND_RESULT: "result ciphertext"}


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
