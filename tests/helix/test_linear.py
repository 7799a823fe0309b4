"""Encrypted affine layers: layouts, correctness against numpy, scaling, and that unused slots carry nothing of the
weights. Real OpenFHE throughout; the small test ring unless a test says it needs the 128-bit preset."""
import numpy as np
import pytest
from scipy import stats

pytest.importorskip("openfhe")  # the CKKS engine runs on CPython 3.10 only

from linalign_jax.errors import LinalignError  # noqa: E402
from linalign_jax.helix import LinearPlan, plan_layout  # noqa: E402
from linalign_jax.helix.sanitize import MESSAGE_FLOOD  # noqa: E402

from tests.helix.conftest import TEST_PRESET, open_sessions  # noqa: E402

REL_TOL = 1e-4


def run_encrypted(layout, A, a, x, input_bound):
    """Encrypt x (one query or [m, d_in]), evaluate y = x A + a on a fresh session pair, decrypt."""
    plan = LinearPlan.build(layout, A, a)
    client, provider = open_sessions(layout, input_bound)
    try:
        return client.decrypt(provider.evaluate(plan, client.encrypt(x)))
    finally:
        provider.close()
        client.close()


def assert_close(y, ref):
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err <= REL_TOL, f"relative error {err:.2e}"


def test_head_layout_for_d4096_k20_uses_17_rotation_keys():
    layout = plan_layout(4096, 20)
    assert (layout.method, layout.preset, layout.n_diagonals, layout.n1, layout.n2) == ("hybrid", "san48_55", 32, 8, 4)
    assert layout.rotation_indices() == (1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 64, 128, 256, 512, 1024, 2048)


def test_square_map_uses_the_replicated_layout_with_two_queries_per_ciphertext():
    layout = plan_layout(768, 768)
    assert (layout.method, layout.period, layout.queries_per_ciphertext) == ("replicated", 2048, 2)
    with pytest.raises(LinalignError, match="no hybrid layout fits a \\[20 → 768\\] layer"):
        plan_layout(20, 768, method="hybrid")
    with pytest.raises(LinalignError, match="unknown method 'diagonal'"):
        plan_layout(20, 20, method="diagonal")
    with pytest.raises(LinalignError, match="positive integers"):
        plan_layout(0, 20)


@pytest.mark.parametrize("d_in,d_out,method,m", [
    (300, 5, "hybrid", 1),
    (2048, 3, "hybrid", 1),  # the input fills every slot of the ring
    (500, 40, "hybrid", 1),
    (64, 64, "replicated", 16),  # 16 queries packed in one ciphertext
    (100, 300, "replicated", 3),  # d_out > d_in
    (300, 5, "replicated", 2),
])
def test_random_layers_match_numpy(rng, d_in, d_out, method, m):
    layout = plan_layout(d_in, d_out, preset=TEST_PRESET, method=method)
    assert layout.method == method
    A, a = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in), rng.normal(size=d_out)
    x = rng.uniform(-3, 3, (m, d_in))
    y = run_encrypted(layout, A, a, x if m > 1 else x[0], input_bound=3.0)
    assert_close(y, x @ A + a if m > 1 else x[0] @ A + a)


def test_production_preset_head_d4096_k20(rng):
    """The headline configuration on the real 128-bit ring 8192."""
    layout = plan_layout(4096, 20)
    A, a = rng.normal(size=(4096, 20)) / 64, rng.normal(size=20)
    x = rng.standard_t(3, 4096)
    y = run_encrypted(layout, A, a, x, input_bound=float(np.abs(x).max()))
    assert_close(y, x @ A + a)


def test_lm_like_embeddings_with_outlier_dimensions(rng):
    """LM final states have a few dimensions 100x larger than the rest; the input bound is set by them, so the bulk
    of the vector uses a tiny part of [-1, 1]. Precision must survive that."""
    x = rng.normal(size=(576,))
    x[[3, 77, 400]] = [180.0, -250.0, 90.0]
    A, a = rng.normal(size=(576, 20)) / 24, rng.normal(size=20)
    A[[3, 77, 400]] *= 0.01  # heads learn small weights on outlier dims
    layout = plan_layout(576, 20, preset=TEST_PRESET)
    assert_close(run_encrypted(layout, A, a, x, input_bound=256.0), x @ A + a)


def test_real_embeddings_and_real_weights():
    """MPNet's trained word embeddings as inputs and its trained pooler matrix as weights (head: 20 of its columns;
    map: the full 768 x 768), from the pinned offline asset."""
    from safetensors import safe_open

    from linalign_jax.assets import fetch

    try:
        path = fetch("all-mpnet-base-v2") / "model.safetensors"
    except Exception as e:  # the asset cache is filled by `make assets`
        pytest.skip(f"all-mpnet-base-v2 asset unavailable: {e}")
    with safe_open(str(path), "numpy") as f:
        x = f.get_slice("embeddings.word_embeddings.weight")[2000:2002].astype(np.float64)
        W = f.get_tensor("pooler.dense.weight").astype(np.float64).T  # y = x W
        b = f.get_tensor("pooler.dense.bias").astype(np.float64)
    bound = float(np.abs(x).max())
    assert_close(run_encrypted(plan_layout(768, 20, preset=TEST_PRESET), W[:, :20], b[:20], x[0], bound),
                 x[0] @ W[:, :20] + b[:20])
    assert_close(run_encrypted(plan_layout(768, 768), W, b, x, bound), x @ W + b)


def test_fused_map_then_head_equals_composition(rng):
    W, b = rng.normal(size=(200, 100)) / 14, rng.normal(size=100)  # map z_B -> z_A
    V, c = rng.normal(size=(100, 6)) / 10, rng.normal(size=6)  # provider head on z_A
    x = rng.uniform(-1, 1, 200)
    layout = plan_layout(200, 6, preset=TEST_PRESET)
    assert_close(run_encrypted(layout, W @ V, b @ V + c, x, 1.0), (x @ W + b) @ V + c)


@pytest.mark.parametrize("weight_scale", [1e-5, 1e4])
def test_weight_magnitude_is_absorbed_by_scaling(rng, weight_scale):
    A, a = rng.normal(size=(300, 5)) * weight_scale, rng.normal(size=5) * weight_scale
    x = rng.uniform(-50, 50, 300)
    layout = plan_layout(300, 5, preset=TEST_PRESET)
    assert_close(run_encrypted(layout, A, a, x, 64.0), x @ A + a)


def test_all_zero_weights_return_the_bias(rng):
    layout = plan_layout(300, 5, preset=TEST_PRESET)
    np.testing.assert_allclose(run_encrypted(layout, np.zeros((300, 5)), np.arange(5.0), np.ones(300), 1.0),
                               np.arange(5.0), atol=1e-6)


def test_bad_weights_are_rejected(rng):
    layout = plan_layout(300, 5, preset=TEST_PRESET)
    with pytest.raises(LinalignError, match=r"weights A \(5, 300\) and bias \(5,\), expected \(300, 5\)"):
        LinearPlan.build(layout, np.zeros((5, 300)), np.zeros(5))
    with pytest.raises(LinalignError, match="weights contain non-finite values at \\[2, 1\\]"):
        LinearPlan.build(layout, np.where(np.arange(1500).reshape(300, 5) == 11, np.inf, 0.0))
    plan = LinearPlan.build(layout, rng.normal(size=(300, 5)) * 1e-3, np.full(5, 1e6))
    client, provider = open_sessions(layout, input_bound=1e-3)
    try:
        with pytest.raises(LinalignError, match="bias .* too large for input_bound 0.001"):
            provider.evaluate(plan, client.encrypt(np.zeros(300)))
    finally:
        provider.close()
        client.close()


@pytest.mark.parametrize("method", ["hybrid", "replicated"])
def test_unused_slots_carry_nothing_of_the_weights(rng, method):
    """Two heads with the same outputs on x but different weights (they differ by a direction orthogonal to x):

    1. before sanitization, the *whole* raw message (every complex slot, read with the secret key) is the same for
       both up to encoding rounding (hybrid: every slot is a copy of an output or zero, because the fold is a full
       trace; replicated: zeros), although the per-class partial sums a naive layout would leave in unused slots
       differ by O(1);
    2. after sanitization, every real part the client does not read and every imaginary part is that value plus a
       fresh Gaussian of std MESSAGE_FLOOD, new for each query.
    """
    from linalign_jax.helix.audit import RawDecryptor

    d, k = 256, 6
    x = rng.uniform(-1, 1, d)
    A1 = rng.normal(size=(d, k)) / 16
    g = rng.normal(size=d)
    A2 = A1 + np.outer(g - x * (x @ g) / (x @ x), rng.normal(size=k))  # differs along a direction orthogonal to x
    np.testing.assert_allclose(x @ A1, x @ A2, atol=1e-12)
    layout = plan_layout(d, k, preset=TEST_PRESET, method=method)
    plans = [LinearPlan.build(layout, A, None) for A in (A1, A2)]
    client, provider = open_sessions(layout, input_bound=1.0)
    try:
        raw = RawDecryptor(client._cc, client._keys, client.preset.base_scale)
        query = provider._load(*_unframe_query(client.encrypt(x)), "query", level=0)
        message = [raw.slots(plan.transform(provider.cc, query)) * plan.scale for plan in plans]
        partial_sums_differ = np.abs((x[:, None] * (A1 - A2))[: d // 2].sum(0)).max()
        assert partial_sums_differ > 0.1
        np.testing.assert_allclose(message[0], message[1], atol=1e-5)
        mask = layout.output_mask(1)
        np.testing.assert_allclose(message[0][mask].real, x @ A1, atol=1e-5)
        if method == "hybrid":  # slot t holds output t mod k' (zero for the padding outputs k..k'-1)
            padded = np.concatenate([x @ A1, np.zeros(layout.n_diagonals - k)])
            expected = np.tile(padded, layout.slots // layout.n_diagonals)
        else:
            expected = np.where(mask, message[0].real, 0.0)
        np.testing.assert_allclose(message[0], expected, atol=1e-5)

        results = [raw.slots(_result_ciphertext(provider.evaluate(plans[0], client.encrypt(x)))) for _ in range(2)]
        for values in results:
            flood = np.concatenate([(values.real - expected / plans[0].scale)[~mask], values.imag])
            assert stats.kstest(flood, stats.norm(0, MESSAGE_FLOOD).cdf).pvalue > 1e-4
            np.testing.assert_allclose(values.real[mask] * plans[0].scale, x @ A1, atol=1e-5)
        assert np.abs(results[0].imag - results[1].imag).min() > 0  # fresh per query
    finally:
        provider.close()
        client.close()


def _result_ciphertext(blob):
    import openfhe as fhe

    from linalign_jax.helix.frames import KIND_RESULT, unframe

    return fhe.DeserializeCiphertextString(unframe(blob, KIND_RESULT)[1], fhe.BINARY)


def _unframe_query(blob):
    from linalign_jax.helix.frames import KIND_QUERY, unframe

    return unframe(blob, KIND_QUERY)
