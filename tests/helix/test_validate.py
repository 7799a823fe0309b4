"""Structural validation (helix/validate.py): honest objects pass, and every mutation the adversarial review used to
crash OpenFHE is refused with the offset it touched — before OpenFHE parses a byte."""
import numpy as np
import pytest

pytest.importorskip("openfhe")

from linalign_jax.errors import LinalignError  # noqa: E402
from linalign_jax.helix import ClientSession, plan_layout, validate  # noqa: E402
from linalign_jax.helix.frames import KIND_BUNDLE, unframe  # noqa: E402
from tests.helix.conftest import TEST_PRESET  # noqa: E402


@pytest.fixture(scope="module")
def honest():
    layout = plan_layout(64, 6, preset=TEST_PRESET)
    client = ClientSession.create(layout, 1.0)
    header, payload = unframe(client.bundle(), KIND_BUNDLE)
    a, b, _ = header["part_sizes"]
    ct = client.query_bytes(client.encrypt(np.zeros(64)))  # OpenFHE's bytes (the wire carries them packed)
    yield layout, client.key_tag, payload[a:a + b], payload[a + b:], ct
    client.close()


def test_honest_key_material_and_ciphertexts_pass(honest):
    layout, tag, pk, rk, ct = honest
    templates = validate.check_key_material(layout, tag, pk, rk)
    templates.ciphertext.check(ct, tag)
    towers = 2 * len(templates.public_key.arrays)  # two polynomials, one array per tower
    assert towers >= 4 and len(templates.rotation_keys.arrays) > len(templates.public_key.arrays)


def mutated(data: bytes, offset: int, value: bytes) -> bytes:
    out = bytearray(data)
    out[offset:offset + len(value)] = value
    return bytes(out)


def test_mutations_are_refused_naming_the_problem(honest):
    layout, tag, pk, rk, ct = honest
    t = validate.templates_for(layout)
    first_word = t.public_key.arrays[0][0]
    q = t.public_key.arrays[0][2]
    cases = [
        # the audit's abort: 8 bytes of 0xFF at offset 470 of the rotation keys ("modulus must be prime")
        (t.rotation_keys, mutated(rk, 470, b"\xff" * 8), "rotation keys: byte 470 differs from this session's"),
        # the audit's segfault in Encrypt: a zeroed 540-byte region of the public key (in its header)
        (t.public_key, mutated(pk, 0, bytes(540)), "public key: byte 0 differs"),
        (t.public_key, pk[:-1], f"{len(pk) - 1} bytes, but an honest one of this session is exactly {len(pk)}"),
        (t.public_key, pk + b"\x00", "an honest one of this session is exactly"),
        (t.public_key, mutated(pk, first_word, q.to_bytes(8, "little")), "coefficient 0 of polynomial 0 .* not below"),
        (t.ciphertext, mutated(ct, 20, b"\x01"), "ciphertext: byte 20 differs"),
        (t.ciphertext, mutated(ct, t.ciphertext.tags[0], b"f" * 32), "key tag at byte .* is not this session's tag"),
    ]
    for template, data, message in cases:
        with pytest.raises(LinalignError, match=message):
            template.check(data, tag)
    with pytest.raises(LinalignError, match="is not this session's tag"):
        t.ciphertext.check(ct, "0" * 32)


def test_coefficients_may_change_below_their_modulus(honest):
    """Everything but coefficient words and tags is fixed; coefficients below q are an honest key's freedom."""
    layout, tag, pk, _, _ = honest
    t = validate.templates_for(layout)
    offset, _, q = t.public_key.arrays[1]
    t.public_key.check(mutated(pk, offset, (q - 1).to_bytes(8, "little")), tag)


def test_unneeded_rotation_keys_are_refused():
    layout = plan_layout(1, 1, preset=TEST_PRESET)
    if layout.rotation_indices():
        pytest.skip("this layout needs rotations")
    with ClientSession.create(layout, 1.0) as client:
        header, payload = unframe(client.bundle(), KIND_BUNDLE)
        a, b, _ = header["part_sizes"]
        with pytest.raises(LinalignError, match="rotation keys: 5 bytes, but this layout needs none"):
            validate.check_key_material(layout, client.key_tag, payload[a:a + b], b"xxxxx")


def test_packed_queries_hold_only_coefficients_and_are_rebuilt_from_the_template(honest):
    """On the wire a query is its coefficient words at bit_length(q) bits each; the provider rebuilds the OpenFHE
    bytes from its own template, so a packed blob can only choose coefficients, each below its modulus."""
    layout, tag, pk, rk, ct = honest
    template = validate.check_key_material(layout, tag, pk, rk).ciphertext
    packed = template.pack(ct)
    bits = sum(n * q.bit_length() for _, n, q in template.arrays)
    assert len(packed) == template.packed_size == bits // 8 and len(packed) < 0.8 * len(ct)
    assert template.unpack(packed, tag) == ct
    with pytest.raises(LinalignError, match="packed bytes, but an honest one"):
        template.unpack(packed + b"\0", tag)
    with pytest.raises(LinalignError, match="not below its modulus"):
        template.unpack(b"\xff" * len(packed), tag)
    with pytest.raises(LinalignError, match="key tag"):
        template.unpack(packed, tag[:-1])
