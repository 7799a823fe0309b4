"""Frame encoding: round trip, and every malformation rejected with a message naming it."""
import struct

import pytest

from linalign_jax.serve import wire


def test_round_trip_keeps_header_and_blobs():
    raw = wire.encode("query", {"session": "abc", "n": 2}, [b"\x00\x01", b"", b"xyz" * 100])
    frame = wire.decode(raw, "query")
    assert frame.kind == "query" and frame.header["session"] == "abc" and frame.header["n"] == 2
    assert frame.blobs == (b"\x00\x01", b"", b"xyz" * 100)
    assert frame.field("n", int) == 2


GOOD = wire.encode("query", {"session": "s"}, [b"abcd"])


@pytest.mark.parametrize("data, message", [
    (b"", "shorter than"),
    (b"XYZ" + GOOD[3:], "magic"),
    (GOOD[:3] + bytes([9]) + GOOD[4:], "version 9"),
    (GOOD[:-1], "declares 4 payload bytes but carries 3"),
    (GOOD + b"!", "declares 4 payload bytes but carries 5"),
    (GOOD[:4] + struct.pack(">I", 10 ** 6) + GOOD[8:], "header length"),
    (wire._PREFIX.pack(wire.MAGIC, wire.VERSION, 3) + b"\xff\xfe\xfd", "not UTF-8 JSON"),
    (wire._PREFIX.pack(wire.MAGIC, wire.VERSION, 2) + b"[]", "JSON object"),
    (wire._PREFIX.pack(wire.MAGIC, wire.VERSION, 26) + b'{"kind":"q","blobs":[-1]} ', "non-negative"),
])
def test_malformed_frames_are_rejected(data, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode(data)


def test_unexpected_kind_and_field_types_are_named():
    with pytest.raises(wire.WireError, match="expected a message of kind 'fit_start'"):
        wire.decode(GOOD, "fit_start")
    frame = wire.decode(wire.encode("q", {"n": True, "s": 3}))
    with pytest.raises(wire.WireError, match="'n' = True is not of type int"):
        frame.field("n", int)
    with pytest.raises(wire.WireError, match="lacks the header field 'missing'"):
        frame.field("missing", str)
