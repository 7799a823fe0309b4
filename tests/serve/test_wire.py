"""The one frame format (engine values and gRPC messages): round trip, and every malformation — including headers
that are too big, too deep, or ill-typed — rejected with a message naming it."""
import json
import struct

import pytest

pytest.importorskip("openfhe")  # linalign_jax.helix imports OpenFHE (CPython 3.10 only)

from linalign_jax.helix import frames  # noqa: E402
from linalign_jax.serve import wire  # noqa: E402


def raw_frame(header_bytes: bytes, tail: bytes = b"") -> bytes:
    return frames._PREFIX.pack(frames.MAGIC, frames.VERSION, len(header_bytes)) + header_bytes + tail


def test_round_trip_keeps_header_and_blobs():
    raw = wire.encode("query", {"session": "abc", "n": 2}, [b"\x00\x01", b"", b"xyz" * 100])
    frame = wire.decode(raw, "query")
    assert frame.kind == "query" and frame.header["session"] == "abc" and frame.header["n"] == 2
    assert frame.blobs == (b"\x00\x01", b"", b"xyz" * 100)
    assert frame.field("n", int) == 2


def test_engine_values_use_the_same_frame():
    blob = frames.frame(frames.KIND_QUERY, {"key_tag": "t", "n": 1}, b"payload")
    assert wire.decode(blob).kind == "query_ciphertext"
    assert frames.unframe(blob, frames.KIND_QUERY) == ({"key_tag": "t", "n": 1}, b"payload")
    with pytest.raises(wire.WireError, match="result ciphertext: expected a message of kind 'result_ciphertext'"):
        frames.unframe(blob, frames.KIND_RESULT)
    with pytest.raises(wire.WireError, match="carries 2 payloads, expected exactly one"):
        frames.unframe(wire.encode("query_ciphertext", {}, [b"a", b"b"]), frames.KIND_QUERY)


GOOD = wire.encode("query", {"session": "s"}, [b"abcd"])


@pytest.mark.parametrize("data, message", [
    (b"", "shorter than"),
    ("text", "must be bytes"),
    (b"XYZ" + GOOD[3:], "magic"),
    (GOOD[:3] + bytes([9]) + GOOD[4:], "version 9"),
    (GOOD[:-1], "declares 4 payload bytes but carries 3"),
    (GOOD + b"!", "declares 4 payload bytes but carries 5"),
    (GOOD[:4] + struct.pack(">I", 10 ** 6) + GOOD[8:], "header length"),
    (raw_frame(b"\xff\xfe\xfd"), "not UTF-8 JSON"),
    (raw_frame(b"[]"), "JSON object"),
    (raw_frame(b'{"kind":"q","blobs":[-1]}'), "non-negative"),
    (raw_frame(b'{"kind":"q","blobs":[],"x":NaN}'), "non-finite number NaN"),
    (raw_frame(b'{"kind":"q","blobs":[],"x":' + b"[" * 30000 + b"]" * 30000 + b"}"), "not UTF-8 JSON|deeper"),
    (raw_frame(b'{"kind":"q","blobs":[],"x":[[[[[[1]]]]]]}'), "nests deeper than 6 levels"),
    (raw_frame(json.dumps({"kind": "q", "blobs": [], "x": list(range(5000))}).encode()), "5000 items"),
    (raw_frame(json.dumps({"kind": "q", "blobs": [], "x": "a" * 5000}).encode()), "string of 5000 characters"),
    (raw_frame(b'{"kind":"q","blobs":[],"x":12345678901234567890}'), "beyond"),
    (raw_frame(b'{"kind":"q","blobs":[],"key_tag":"\\udcff"}'), "not valid Unicode"),
])
def test_malformed_frames_are_rejected(data, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode(data)


def test_unexpected_kind_and_field_types_are_named():
    with pytest.raises(wire.WireError, match="expected a message of kind 'fit_start'"):
        wire.decode(GOOD, "fit_start")
    frame = wire.decode(wire.encode("q", {"n": True, "s": 3, "f": 2}))
    with pytest.raises(wire.WireError, match="'n' = True is not of type int"):
        frame.field("n", int)
    with pytest.raises(wire.WireError, match="lacks the header field 'missing'"):
        frame.field("missing", str)
    assert frame.field("f", float) == 2  # an integer is a fine float


def test_oversized_header_is_refused_when_encoding():
    with pytest.raises(wire.WireError, match="above the 65536-byte limit"):
        wire.encode("q", {"x": "a" * 70000})
