import numpy as np
import pytest

from linalign_jax import similarity as sim
from linalign_jax.errors import LinalignError

RNG = np.random.default_rng(0)
X = RNG.normal(size=(150, 12))
Y = X @ RNG.normal(size=(12, 9)) + 0.8 * RNG.normal(size=(150, 9))
Z = RNG.normal(size=(150, 9))  # unrelated


def _hsic_biased(K, L):
    n = len(K)
    H = np.eye(n) - 1.0 / n
    return np.trace(K @ H @ L @ H)


def _hsic_unbiased(K, L):
    n = len(K)
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    return (np.trace(K @ L) + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * K.sum(0) @ L.sum(0)) / (
        n * (n - 3))


def _cka(hsic, K, L):
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def _rbf_gram(a):
    sq = (a ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * a @ a.T, 0)
    return np.exp(-d2 / (2 * np.median(d2)))


def test_linear_cka_equals_gram_formulas():
    K, L = X @ X.T, Y @ Y.T
    assert sim.linear_cka(X, Y) == pytest.approx(_cka(_hsic_biased, K, L), rel=1e-4)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    assert sim.linear_cka(X, Y, debiased=True) == pytest.approx(
        _cka(_hsic_unbiased, Xc @ Xc.T, Yc @ Yc.T), rel=1e-4)


def test_debiasing_removes_the_high_dimensional_bias():
    a, b = RNG.normal(size=(60, 200)), RNG.normal(size=(60, 200))  # independent, d >> n
    assert sim.linear_cka(a, b) > 0.5                       # biased CKA is fooled
    assert abs(sim.linear_cka(a, b, debiased=True)) < 0.05  # debiased is not


def test_rbf_cka_blockwise_equals_full_gram():
    want = _cka(_hsic_biased, _rbf_gram(X), _rbf_gram(Y))
    assert sim.rbf_cka(X, Y, block=32) == pytest.approx(want, rel=1e-3)
    assert sim.rbf_cka(X, Y, block=32) == pytest.approx(sim.rbf_cka(X, Y, block=1024), rel=1e-5)


def test_invariances_and_identity():
    q, _ = np.linalg.qr(RNG.normal(size=(12, 12)))
    rotated = 3.0 * X @ q + 7.0
    assert sim.linear_cka(X, rotated) == pytest.approx(1.0, abs=1e-5)
    assert sim.rbf_cka(X, rotated) == pytest.approx(1.0, abs=1e-4)
    assert sim.svcca(X, rotated, dims=8)["train"] == pytest.approx(1.0, abs=1e-4)
    assert sim.linear_cka(X, Y) > sim.linear_cka(X, Z)


def test_svcca_train_and_held_out():
    related = sim.svcca(X[:100], Y[:100], dims=6, x_test=X[100:], y_test=Y[100:])
    unrelated = sim.svcca(X[:100], Z[:100], dims=6, x_test=X[100:], y_test=Z[100:])
    assert related["dims"] == 6
    assert related["test"] > 0.5 > abs(unrelated["test"])
    assert related["train"] >= related["test"] - 0.05


def test_mutual_knn_with_permutation_null():
    same = sim.mutual_knn(X, 2.0 * X, k=10, n_permutations=20)
    assert same["score"] == pytest.approx(1.0)
    assert same["z"] > 10
    other = sim.mutual_knn(X, Z, k=10, n_permutations=50)
    assert other["null_mean"] == pytest.approx(10 / 149, abs=0.03)  # chance overlap ≈ k / (N − 1)
    assert abs(other["z"]) < 4


def test_knn_blocks_agree_with_brute_force():
    got = sim.knn_indices(X.astype(np.float32), 5, block=16)
    xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    want = np.argsort(-s, axis=1)[:, :5]
    assert (np.sort(got, 1) == np.sort(want, 1)).mean() > 0.99  # float32 near-ties may swap


def test_similarity_matrices_are_symmetric():
    mats = sim.similarity_matrices({"x": X, "y": Y, "z": Z}, measures=("linear_cka", "mutual_knn"))
    assert set(mats) == {"linear_cka", "mutual_knn", "mutual_knn_z"}
    np.testing.assert_allclose(mats["linear_cka"], mats["linear_cka"].T)
    np.testing.assert_allclose(np.diag(mats["linear_cka"]), 1.0, atol=1e-5)


def test_bad_input():
    with pytest.raises(LinalignError, match="same N"):
        sim.linear_cka(X, Y[:100])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(LinalignError, match="NaN"):
        sim.rbf_cka(bad, Y)
    with pytest.raises(LinalignError, match="unknown similarity measure"):
        sim.similarity(X, Y, ["pwcca"])
    with pytest.raises(LinalignError, match="k=150"):
        sim.mutual_knn(X, Y, k=150)
