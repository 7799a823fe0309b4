"""Both parties' math of the secure map fit, in one process (the transport is tested in tests/serve)."""
import numpy as np
import pytest

pytest.importorskip("openfhe")  # the CKKS engine runs on CPython 3.10 only

from linalign_jax.errors import LinalignError  # noqa: E402
from linalign_jax.helix.protocol import (ProviderCore, PublicEmbeddings, QueryClient, SecureFitClient, ServedHead,  # noqa: E402
                                         _chunks)

PRESET = "insecure_n4096"


@pytest.fixture(scope="module")
def parties():
    rng = np.random.default_rng(0)
    Z_B = rng.normal(size=(300, 12)) * 0.3
    Z_A = Z_B @ rng.normal(size=(12, 10)) + 0.1 * rng.normal(size=(300, 10)) + 1.0
    head = ServedHead(rng.normal(size=(10, 3)), rng.normal(size=3), ("a", "b", "c"))
    core = ProviderCore(head, public=PublicEmbeddings.from_array("pub", Z_A), preset=PRESET)
    return core, Z_A, Z_B, head


def run_fit(core, Z_B, rank, drop_last=False):
    client = SecureFitClient(Z_B, core.describe()["fit"], rank=rank)
    state, _ = core.open_session(client.open_fields(), [client.bundle()])
    try:
        replies = list(core.fit(state, client.start_fields(), client.batches(), max_reply_bytes=400_000))
    finally:
        core.release(state)
    if drop_last:
        replies[-1] = (replies[-1][0], replies[-1][1][:-1])
    try:
        return client.solve(replies, lam=0.1)
    finally:
        client.close()


def test_full_rank_fit_equals_plaintext_ridge_through_the_fitted_head(parties):
    from linalign_jax.align.ridge import fit_ridge

    core, Z_A, Z_B, head = parties
    affine, info = run_fit(core, Z_B, rank=0)
    ref, _ = fit_ridge(Z_B, Z_A, lam=0.1)
    fitted = core.head(info["helix_head"])
    got = (Z_B @ affine.W + affine.b) @ fitted.V + fitted.c
    want = (Z_B @ np.asarray(ref.W, np.float64) + np.asarray(ref.b)) @ head.V + head.c
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the client never learned mean(Z_A): its map sends mean(Z_B) to 0, the provider's bias carries mean(Z_A) V
    np.testing.assert_allclose(Z_B.mean(0) @ affine.W + affine.b, 0, atol=1e-5)


def test_rank_r_fit_equals_the_plaintext_reduced_pipeline(parties):
    """Each side projects on its own top-r principal axes; the provider re-expresses its head in its basis."""
    core, Z_A, Z_B, head = parties
    r = 4
    affine, info = run_fit(core, Z_B, rank=r)
    fitted = core.head(info["helix_head"])
    assert affine.W.shape == (12, r) and fitted.V.shape == (r, 3)
    cb, ca = Z_B - Z_B.mean(0), Z_A - Z_A.mean(0)
    pb = np.linalg.eigh(cb.T @ cb)[1][:, ::-1][:, :r]
    pa = np.linalg.eigh(ca.T @ ca)[1][:, ::-1][:, :r]
    xb, xa = cb @ pb, ca @ pa
    W = np.linalg.solve(xb.T @ xb + 0.1 * np.eye(r), xb.T @ xa)
    want = (cb @ pb @ W) @ (pa.T @ head.V) + head.c + Z_A.mean(0) @ head.V
    got = (Z_B @ affine.W + affine.b) @ fitted.V + fitted.c
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_partial_fit_results_give_no_map(parties):
    core, _, Z_B, _ = parties
    with pytest.raises(LinalignError, match="no map is produced from a partial fit"):
        run_fit(core, Z_B, rank=2, drop_last=True)


def test_fit_rejects_other_public_sets_and_duplicate_columns(parties):
    core, _, Z_B, _ = parties
    client = SecureFitClient(Z_B, core.describe()["fit"], rank=2)
    state, _ = core.open_session(client.open_fields(), [client.bundle()])
    try:
        with pytest.raises(LinalignError, match="provider holds 'pub'"):
            list(core.fit(state, {**client.start_fields(), "public_set": "other"}, iter(()), max_reply_bytes=1 << 20))
        batch = next(client.batches())
        with pytest.raises(LinalignError, match="sent twice"):
            list(core.fit(state, client.start_fields(), iter([batch, batch]), max_reply_bytes=1 << 20))
        with pytest.raises(LinalignError, match="opened for a fit"):
            core.query(state, {}, [b"x"])
    finally:
        core.release(state)
        client.close()


def test_query_session_validates_layout(parties):
    core, _, _, _ = parties
    wrong = QueryClient(8, 3, 4.0, preset=PRESET)
    with pytest.raises(LinalignError, match="layout"):
        core.open_session(wrong.open_fields(), [wrong.bundle()])
    wrong.close()


def test_chunks_respect_the_size_limit_and_keep_order():
    blobs = [bytes([i]) * 100 for i in range(7)]
    parts = list(_chunks({"head": "h"}, blobs, 250, first_part=3, offset=10))
    assert [len(p) for _, p in parts] == [2, 2, 2, 1]
    assert [f["offset"] for f, _ in parts] == [10, 12, 14, 16] and [f["part"] for f, _ in parts] == [3, 4, 5, 6]
    assert b"".join(b for _, p in parts for b in p) == b"".join(blobs)


def test_constant_client_feature_is_encrypted_as_zeros(parties):
    """A feature that is constant on the public set centres to float noise (~1e-17), which OpenFHE cannot encode."""
    core, _, Z_B, _ = parties
    with_constant = np.c_[Z_B, np.full(len(Z_B), 0.1)]
    affine, _ = run_fit(core, with_constant, rank=0)
    # only noise: the flood (slot std ~2^-25) times the output scale (128 here) over the ridge λ = 0.1
    assert np.abs(affine.W[-1]).max() < 5e-4 < 1e-2 < np.abs(affine.W[:-1]).max()
