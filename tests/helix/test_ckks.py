"""CKKS layer: presets, headroom, wire format, bundle validation, key isolation between sessions, bad input."""
import numpy as np
import pytest

fhe = pytest.importorskip("openfhe")  # the CKKS engine runs on CPython 3.10 only

from linalign_jax.errors import LinalignError  # noqa: E402
from linalign_jax.helix import PRESETS, ClientSession, LinearPlan, ProviderSession, choose_preset, plan_layout  # noqa: E402
from linalign_jax.helix.frames import KIND_QUERY, KIND_RESULT, frame, unframe  # noqa: E402
from linalign_jax.helix.keys import serialize_rotation_keys  # noqa: E402
from linalign_jax.helix.presets import HE_STANDARD_128_LOG_QP, context_for, log2_qp  # noqa: E402

from tests.helix.conftest import TEST_ALLOWED, TEST_PRESET, open_sessions  # noqa: E402


def test_presets_give_the_documented_rings_at_128_bits():
    """The production ring and its log2(QP) against the HE standard's bound (the context builder asserts it too)."""
    assert context_for("san48_55").GetRingDimension() == 8192
    assert 200 < log2_qp("san48_55") <= HE_STANDARD_128_LOG_QP[8192] == 218
    assert choose_preset(4096).name == "san48_55"
    assert choose_preset(4097).name == "san48_55_n16384"
    with pytest.raises(LinalignError, match="exceeds the largest preset"):
        choose_preset(10**5)
    with pytest.raises(LinalignError, match="unknown CKKS preset 'nope'"):
        context_for("nope")


def test_larger_ring_is_chosen_when_d_exceeds_4096_slots():
    assert plan_layout(5000, 20).preset == "san48_55_n16384"
    assert plan_layout(4096, 20).preset == "san48_55"


@pytest.mark.parametrize("preset", ["san48_55", TEST_PRESET])
def test_headroom_constant_is_safe_and_the_limit_is_real(preset):
    """Through the real level chain (degree-2 query × degree-1 plaintext, two rescales), products up to the preset's
    headroom decrypt exactly; 8x beyond it OpenFHE silently returns garbage. All slots in phase (a constant vector) is
    the worst case: the whole value sits in one coefficient, which must stay below half the final modulus (2^54)."""
    p = PRESETS[preset]
    cc = context_for(p)
    keys = cc.KeyGen()
    x = np.ones(p.slots)
    ct = cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext(x, 2, 0))

    def decrypted_product(weight):
        product = cc.EvalMult(ct, cc.MakeCKKSPackedPlaintext(np.full(p.slots, weight)))
        out = cc.Decrypt(cc.Rescale(cc.Rescale(product)), keys.secretKey)
        out.SetLength(p.slots)
        return np.asarray(out.GetRealPackedValue())

    np.testing.assert_allclose(decrypted_product(p.headroom), x * p.headroom, atol=1e-6 * p.headroom)
    assert np.abs(decrypted_product(8 * p.headroom) - x * 8 * p.headroom).max() > 4 * p.headroom


def test_frames_reject_malformed_bytes():
    blob = frame(KIND_QUERY, {"a": 1}, b"payload")
    assert unframe(blob, KIND_QUERY) == ({"a": 1}, b"payload")
    cases = {  # more frame cases in tests/serve/test_wire.py (one frame format for engine and wire)
        b"": "shorter than the 8-byte frame prefix",
        b"garbage" * 10: "HELIX magic",
        blob[:-2]: "declares 7 payload bytes but carries 5",
        blob[:16]: "header length",
    }
    for bad, message in cases.items():
        with pytest.raises(LinalignError, match=message):
            unframe(bad, KIND_QUERY)
    with pytest.raises(LinalignError, match="expected a message of kind 'result_ciphertext'"):
        unframe(blob, KIND_RESULT)
    with pytest.raises(LinalignError, match="must be bytes, got str"):
        unframe("text", KIND_QUERY)


def test_bundle_validation(head_setup):
    layout, _, _, plan, client, _ = head_setup
    bundle = client.bundle()
    with pytest.raises(LinalignError, match="preset 'insecure_n4096' not allowed"):
        ProviderSession.load(bundle)  # providers refuse the insecure test ring by default
    header, payload = unframe(bundle, 1)
    with pytest.raises(LinalignError, match="context is preset insecure_n4096, header says san48_55"):  # wrong ring
        ProviderSession.load(frame(1, dict(header, preset="san48_55"), payload), allowed_presets=TEST_ALLOWED)
    with pytest.raises(LinalignError, match="part sizes"):
        ProviderSession.load(frame(1, dict(header, part_sizes=[1, 2, 3]), payload), allowed_presets=TEST_ALLOWED)
    with pytest.raises(LinalignError, match="header field missing"):
        ProviderSession.load(frame(1, {"preset": TEST_PRESET}, payload), allowed_presets=TEST_ALLOWED)
    sizes = header["part_sizes"]
    garbled = b"\x00" * sizes[0] + payload[sizes[0]:]
    with pytest.raises(LinalignError, match="not the serialization of any allowed preset"):
        ProviderSession.load(frame(1, header, garbled), allowed_presets=TEST_ALLOWED)
    garbled_key = payload[: sizes[0]] + b"\x00" * sizes[1] + payload[sizes[0] + sizes[1]:]
    with pytest.raises(LinalignError, match="public key: byte 0 differs from this session's structure"):
        ProviderSession.load(frame(1, header, garbled_key), allowed_presets=TEST_ALLOWED)
    with pytest.raises(LinalignError, match="public key: the key tag at byte [0-9]+ is not this session's tag ffffff"):
        ProviderSession.load(frame(1, dict(header, key_tag="f" * 32), payload), allowed_presets=TEST_ALLOWED)


def test_missing_rotation_keys_are_named(rng):
    small = plan_layout(300, 3, preset=TEST_PRESET)  # 4 diagonals: baby step 1, giant step 2, fold from 4
    bigger = plan_layout(300, 5, preset=TEST_PRESET)  # 8 diagonals: giant steps 2, 4, 6
    client, provider = open_sessions(small)
    try:
        plan = LinearPlan.build(bigger, rng.normal(size=(300, 5)), None)
        provider.layout_json = bigger.to_json()  # a session that claims the layout but lacks its keys
        with pytest.raises(LinalignError, match=r"lacks rotation keys for indices \[6\]"):
            provider.evaluate(plan, client.encrypt(np.zeros(300)))
    finally:
        provider.close()
        client.close()


def test_plan_of_another_layout_is_rejected(head_setup, rng):
    _, _, _, _, client, provider = head_setup
    other = plan_layout(300, 7, preset=TEST_PRESET)
    with pytest.raises(LinalignError, match="plan layout .* differs from the session's"):
        provider.evaluate(LinearPlan.build(other, rng.normal(size=(300, 7))), client.encrypt(np.zeros(300)))


def test_bad_queries_are_rejected_with_their_problem(head_setup):
    layout, _, _, plan, client, provider = head_setup
    x = np.zeros(300)
    with pytest.raises(LinalignError, match=r"non-finite value nan at index \(0, 5\)"):
        client.encrypt(np.where(np.arange(300) == 5, np.nan, x))
    with pytest.raises(LinalignError, match=r"\|value\| 9 at index \(0, 7\) exceeds the bound 4"):
        client.encrypt(np.where(np.arange(300) == 7, -9.0, x))
    with pytest.raises(LinalignError, match=r"query shape \(299,\), expected \[300\]"):
        client.encrypt(np.zeros(299))
    with pytest.raises(LinalignError, match="2 queries in one ciphertext; this layout holds 1..1"):
        client.encrypt(np.zeros((2, 300)))
    with pytest.raises(LinalignError, match="input_bound must be a positive finite number"):
        ClientSession.create(layout, input_bound=float("inf"))
    with pytest.raises(LinalignError, match="HELIX magic"):
        provider.evaluate(plan, b"not a ciphertext")
    result = provider.evaluate(plan, client.encrypt(x))
    with pytest.raises(LinalignError, match="expected a message of kind 'query_ciphertext', got 'result_ciphertext'"):
        provider.evaluate(plan, result)
    # A result ciphertext (one tower, level 2) re-framed as a query: not the structure of a fresh query.
    _, payload = unframe(result, KIND_RESULT)
    with pytest.raises(LinalignError, match="bytes, but an honest one of this session is exactly"):
        provider.evaluate(plan, frame(KIND_QUERY, {"key_tag": client.key_tag, "n": 1}, payload))
    # Garbled ciphertext bytes with a valid frame never reach OpenFHE (validate.py; more in tests/helix/test_validate.py).
    for garbage in (b"\x01" * 64, b"\x00" * 64):
        with pytest.raises(LinalignError, match="query ciphertext: 64 packed bytes, but an honest one"):
            provider.evaluate(plan, frame(KIND_QUERY, {"key_tag": client.key_tag, "n": 1}, garbage))


def test_ciphertexts_of_other_sessions_and_rings_are_rejected(head_setup, rng):
    layout, _, _, plan, client, provider = head_setup
    other_client, other_provider = open_sessions(layout)
    try:
        foreign = other_client.encrypt(np.zeros(300))
        with pytest.raises(LinalignError, match="not this session's key"):
            provider.evaluate(plan, foreign)
        # The header lies: on the wire a query is only its coefficients (validate.py: the provider rebuilds the rest
        # from this session's template), so it is evaluated as this session's ciphertext, and its result is bound to
        # this session's key: the other session's client cannot decrypt it.
        _, payload = unframe(foreign, KIND_QUERY)
        relabelled = provider.evaluate(plan, frame(KIND_QUERY, {"key_tag": client.key_tag, "n": 1}, payload))
        with pytest.raises(LinalignError, match="not this session's key"):
            other_client.decrypt(relabelled)
        with pytest.raises(LinalignError, match="not this session's key"):
            client.decrypt(other_provider.evaluate(plan, foreign))
    finally:
        other_provider.close()
        other_client.close()
    # A ciphertext of the 8192 ring presented to a session on the 4096 ring.
    big_cc = context_for("san48_55")
    big = big_cc.Encrypt(big_cc.KeyGen().publicKey, big_cc.MakeCKKSPackedPlaintext(np.zeros(8)))
    with pytest.raises(LinalignError, match="ciphertext: [0-9]+ packed bytes, but an honest one of this session is"):
        provider.evaluate(plan, frame(KIND_QUERY, {"key_tag": client.key_tag, "n": 1}, fhe.Serialize(big, fhe.BINARY)))


def test_two_sessions_with_different_keys_share_one_process(rng):
    """Each session's rotation keys live under its own key tag; closing one leaves the other working."""
    layout = plan_layout(300, 5, preset=TEST_PRESET)
    A, a = rng.normal(size=(300, 5)) / 17, rng.normal(size=5)
    plan = LinearPlan.build(layout, A, a)
    (c1, p1), (c2, p2) = open_sessions(layout), open_sessions(layout, input_bound=2.0)
    assert c1.key_tag != c2.key_tag
    x1, x2 = rng.uniform(-4, 4, 300), rng.uniform(-2, 2, 300)
    q1, q2 = c1.encrypt(x1), c2.encrypt(x2)
    r2, r1 = p2.evaluate(plan, q2), p1.evaluate(plan, q1)  # interleaved
    np.testing.assert_allclose(c1.decrypt(r1), x1 @ A + a, atol=1e-5)
    np.testing.assert_allclose(c2.decrypt(r2), x2 @ A + a, atol=1e-5)
    p1.close()
    c1.close()
    c1.close()  # idempotent: must not release the other session's keys
    with pytest.raises(LinalignError, match="is closed"):
        p1.evaluate(plan, q1)
    np.testing.assert_allclose(c2.decrypt(p2.evaluate(plan, q2)), x2 @ A + a, atol=1e-5)
    assert not context_for(TEST_PRESET).GetExistingEvalAutomorphismKeyIndices(c1.key_tag)
    p2.close()
    c2.close()


def test_bundle_with_keys_of_a_foreign_tag_is_rejected(head_setup):
    layout, _, _, _, client, provider = head_setup
    intruder = ClientSession.create(layout, input_bound=1.0)
    intruder_keys = serialize_rotation_keys(context_for(layout.preset), intruder.key_tag)
    intruder.close()  # its keys are no longer registered in this process: they are foreign now
    header, payload = unframe(client.bundle(), 1)
    cc_pk = payload[: sum(header["part_sizes"][:2])]
    forged = frame(1, dict(header, key_tag=client.key_tag,
                           part_sizes=header["part_sizes"][:2] + [len(intruder_keys)]), cc_pk + intruder_keys)
    with pytest.raises(LinalignError, match="rotation keys: the key tag at byte [0-9]+ is not this session's tag"):
        ProviderSession.load(forged, allowed_presets=TEST_ALLOWED)
    provider.require_rotations(layout.rotation_indices())  # the honest session's keys survived
