"""Bulk feature-major mode: many queries, one ciphertext per feature, no rotation keys."""
import numpy as np
import pytest
from scipy import stats

pytest.importorskip("openfhe")  # the CKKS engine runs on CPython 3.10 only

from linalign_jax.errors import LinalignError  # noqa: E402
from linalign_jax.helix import BulkLayout, BulkPlan, ClientSession, ProviderSession  # noqa: E402
from linalign_jax.helix.sanitize import MESSAGE_FLOOD  # noqa: E402

from tests.helix.conftest import TEST_ALLOWED, TEST_PRESET  # noqa: E402


@pytest.fixture
def bulk_setup(rng):
    layout = BulkLayout(40, 6, preset=TEST_PRESET)
    A, a = rng.normal(size=(40, 6)) / 6, rng.normal(size=6)
    client = ClientSession.create(layout, input_bound=2.0)
    provider = ProviderSession.load(client.bundle(), allowed_presets=TEST_ALLOWED)
    yield layout, BulkPlan.build(layout, A, a), A, a, client, provider
    provider.close()
    client.close()


def test_bulk_matches_numpy_and_needs_no_rotation_keys(bulk_setup, rng):
    layout, plan, A, a, client, provider = bulk_setup
    assert layout.rotation_indices() == ()
    x = rng.uniform(-2, 2, (300, 40))
    y = client.decrypt_bulk(provider.evaluate_bulk(plan, client.encrypt_bulk(x)))
    ref = x @ A + a
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bulk_unused_slots_are_flooded(bulk_setup, rng):
    layout, plan, _, _, client, provider = bulk_setup
    results = provider.evaluate_bulk(plan, client.encrypt_bulk(rng.uniform(-2, 2, (10, 40))))
    unused = client._decrypt_result(results[0])[1][10:]
    assert stats.kstest(unused, stats.norm(0, MESSAGE_FLOOD).cdf).pvalue > 1e-4


def test_bulk_bad_input(bulk_setup, rng):
    layout, plan, _, _, client, provider = bulk_setup
    with pytest.raises(LinalignError, match=r"bulk batch shape \(10, 39\), expected \[n, 40\]"):
        client.encrypt_bulk(np.zeros((10, 39)))
    with pytest.raises(LinalignError, match="non-finite value nan"):
        client.encrypt_bulk(np.full((3, 40), np.nan))
    frames = client.encrypt_bulk(np.zeros((3, 40)))
    with pytest.raises(LinalignError, match="39 bulk feature frames, expected d_in=40"):
        provider.evaluate_bulk(plan, frames[:-1])
    with pytest.raises(LinalignError, match="bulk frame 0 holds feature 1"):
        provider.evaluate_bulk(plan, frames[1:] + frames[:1])
    with pytest.raises(LinalignError, match="encrypt\\(\\) needs a linear layout"):
        client.encrypt(np.zeros(40))
    results = provider.evaluate_bulk(plan, frames)
    with pytest.raises(LinalignError, match="bulk result frame 0 holds output 1"):
        client.decrypt_bulk(results[1:] + results[:1])
