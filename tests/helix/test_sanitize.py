"""Sanitization: the red-team attacks recover nothing beyond the logits on the production preset, the flood has the
width the bound asks for, and it covers the measured weight-dependent noise with the stated margin.

On the engine before sanitization (commit d21641b) the same head attack (`experiments.attack_helix --attack=head,c1
--d=256 --k=6 --queries=3 --preset=hyb40_50`) recovered V with relative error 0.072 and correlation 0.997 from 3
queries, and c1 of two evaluations of one query was 100% identical: these tests failed there."""
import math

import numpy as np
import pytest

from linalign_jax.helix import ClientSession, LinearPlan, ProviderSession, plan_layout
from linalign_jax.helix.audit import RawDecryptor
from linalign_jax.helix.sanitize import NOISE_BOUND_LOG2, noise_flood_log2, sanitize
from linalign_jax.helix.frames import KIND_QUERY, unframe
from linalign_jax.helix.protocol import ProviderCore, PublicEmbeddings, SecureFitClient, ServedHead

from tests.helix.conftest import TEST_PRESET


def test_head_attacks_on_the_production_preset_get_nothing_beyond_the_logits():
    from experiments.attack_helix import attack_c1, attack_head

    head = attack_head(256, 6, 3, None, np.random.default_rng(7))  # production preset (san48_55, ring 8192)
    assert head["baseline_relative_error"] > 0.95  # 3 < d logit vectors: almost nothing about V
    assert head["relative_error"] >= head["baseline_relative_error"]
    assert abs(head["correlation"]) < 0.2
    assert attack_c1(256, 6, None, np.random.default_rng(8))["identical_c1_fraction"] < 1e-3


@pytest.fixture(scope="module")
def production_session():
    """A d=4096, k=20 head (the benchmark's shape: the most rotations and products) on the production ring."""
    rng = np.random.default_rng(3)
    layout = plan_layout(4096, 20)
    plan = LinearPlan.build(layout, rng.normal(size=(4096, 20)) / 64, rng.normal(size=20))
    client = ClientSession.create(layout, input_bound=1.0)
    provider = ProviderSession.load(client.bundle())
    yield layout, plan, client, provider, RawDecryptor(client._cc, client._keys, client.preset.base_scale)
    provider.close()
    client.close()


def test_measured_noise_is_far_below_the_bound_the_flood_is_sized_for(production_session):
    """The raw decryption of the unsanitized result for a zero query is pure noise (a zero vector encodes to the zero
    polynomial): the weight-dependent noise the flood must cover. It stays >= 16x below B."""
    layout, plan, client, provider, raw = production_session
    query = provider._load(*unframe(client.encrypt(np.zeros(4096)), KIND_QUERY), "query", level=0)
    noise = raw.coefficients(plan.transform(provider.cc, query))[0]
    measured = max(abs(int(v)) for v in noise)
    print(f"max |noise coefficient| at the flooding point: 2^{math.log2(measured):.1f}, bound B = 2^{NOISE_BOUND_LOG2}")
    assert 0 < measured * 16 <= 2.0 ** NOISE_BOUND_LOG2


def test_flood_width_is_what_the_bound_asks_for_in_every_coefficient(production_session):
    """With no message flood (every slot read) and a zero message, the sanitized result's coefficients are the noise
    flood divided by the rescaling prime q1 ≈ 2^48: iid Gaussian of std 2^(log2 σ_F - 48), fresh each time."""
    layout, plan, client, provider, raw = production_session
    query = provider._load(*unframe(client.encrypt(np.zeros(4096)), KIND_QUERY), "query", level=0)
    acc = plan.transform(provider.cc, query)
    every = np.ones(layout.slots, dtype=bool)
    draws = [np.array([float(v) for v in raw.coefficients(sanitize(provider.cc, provider.public_key, acc,
                                                                    client.preset, np.zeros(layout.slots), every, 0.0))[0]])
             for _ in range(2)]
    want = 2.0 ** (noise_flood_log2(client.preset) - client.preset.scaling_mod_size)
    for coef in draws:
        assert abs(coef.std() / want - 1) < 0.05
        assert abs(np.mean(coef ** 4) / coef.var() ** 2 - 3) < 0.3  # Gaussian kurtosis, in every coefficient alike
        assert abs(coef[: len(coef) // 2].std() / coef[len(coef) // 2:].std() - 1) < 0.1
    assert abs(np.corrcoef(draws[0], draws[1])[0, 1]) < 0.05  # fresh per response


def test_fit_with_one_row_more_than_a_block_returns_one_sum_per_column():
    """N = slots + 1 (4097 on the production ring, 2049 here): two balanced blocks, summed by the provider, one
    sanitized result per column, and the map equals the plaintext ridge."""
    from linalign_jax.align.ridge import fit_ridge

    rng = np.random.default_rng(5)
    n = 2049
    Z_B = rng.normal(size=(n, 6)) * 0.3
    Z_A = Z_B @ rng.normal(size=(6, 5)) + 0.1 * rng.normal(size=(n, 5)) + 1.0
    head = ServedHead(rng.normal(size=(5, 3)), rng.normal(size=3), ("a", "b", "c"))
    core = ProviderCore(head, public=PublicEmbeddings.from_array("pub", Z_A), preset=TEST_PRESET)
    assert core.describe()["fit"]["block"] == 1025
    client = SecureFitClient(Z_B, core.describe()["fit"], rank=0)
    state, _ = core.open_session(client.open_fields(), [client.bundle()])
    try:
        replies = list(core.fit(state, client.start_fields(), client.batches(), max_reply_bytes=1 << 30))
    finally:
        core.release(state)
    assert client.n_blocks == 2 and sum(len(blobs) for _, blobs in replies) == 6  # one per column, not per block
    affine, info = client.solve(replies, lam=0.1)
    client.close()
    fitted = core.head(info["helix_head"])
    ref, _ = fit_ridge(Z_B, Z_A, lam=0.1)
    got = (Z_B @ affine.W + affine.b) @ fitted.V + fitted.c
    want = (Z_B @ np.asarray(ref.W, np.float64) + np.asarray(ref.b)) @ head.V + head.c
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
