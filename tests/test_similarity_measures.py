"""The measures added next to CKA / SVCCA / mutual kNN, each against an independent dense computation written from
the peers' published definitions (platonic-rep `metrics.py`, netrep `LinearMetric` + `whiten`, RSA with scipy):
different code paths (N×N matrices, argsort, explicit zero-padding and alignment), on small fixtures."""
import jax
import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, spearmanr

from linalign_jax import similarity as sim
from linalign_jax.errors import LinalignError

RNG = np.random.default_rng(1)
# float32-representable, so the library's float32 inputs are exactly the reference's float64 ones
X = RNG.normal(size=(80, 10)).astype(np.float32).astype(np.float64)
Y = (X @ RNG.normal(size=(10, 14)) + 0.7 * RNG.normal(size=(80, 14))).astype(np.float32).astype(np.float64)
K = 6


def _neighbours(a):  # platonic-rep compute_nearest_neighbors: inner products, diagonal -1e8, argsort descending
    s = a @ a.T
    np.fill_diagonal(s, -1e8)
    return np.argsort(-s, axis=1, kind="stable")[:, :K]


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _lcs(a, b):
    dp = np.zeros((len(a) + 1, len(b) + 1), int)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            dp[i, j] = dp[i - 1, j - 1] + 1 if a[i - 1] == b[j - 1] else max(dp[i - 1, j], dp[i, j - 1])
    return dp[-1, -1]


def _hsic_unbiased(k, l):  # platonic-rep hsic_unbiased (Song et al. 2012, Eq. 5), for non-symmetric k, l too
    m = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    return ((k * l.T).sum() + k.sum() * l.sum() / ((m - 1) * (m - 2)) - 2 * (k @ l).sum() / (m - 2)) / (m * (m - 3))


def _cknna(a, b, eps=0.0):
    ka, kb = a @ a.T, b @ b.T

    def s(k, l):
        masks = []
        for g in (k, l):
            h = g.copy()
            np.fill_diagonal(h, -np.inf)
            mask = np.zeros_like(g)
            np.put_along_axis(mask, np.argsort(-h, axis=1)[:, :K], 1.0, axis=1)
            masks.append(mask)
        m = masks[0] * masks[1]
        return _hsic_unbiased(m * k, m * l)

    return s(ka, kb) / (np.sqrt(s(ka, ka) * s(kb, kb)) + eps)


def _netrep_angle(a, b, alpha, pca=None):  # netrep LinearMetric(alpha).fit_score with zero_pad, center_columns
    a, b = a - a.mean(0), b - b.mean(0)
    if pca:
        a = a @ np.linalg.svd(a, full_matrices=False)[2][:pca].T
        b = b @ np.linalg.svd(b, full_matrices=False)[2][:pca].T
    d = max(a.shape[1], b.shape[1])
    a, b = (np.pad(m, ((0, 0), (0, d - m.shape[1]))) for m in (a, b))

    def whiten(m):
        if alpha > 1 - 1e-7:
            return m
        lam, v = np.linalg.eigh(m.T @ m)
        lam = np.maximum(lam, 1e-7)
        scale = alpha + (1 - alpha) * lam ** -0.5
        new_var = np.sum(alpha ** 2 * lam + 2 * alpha * (1 - alpha) * lam ** 0.5 + (1 - alpha) ** 2)
        return m @ ((v * (scale * np.sqrt(lam.sum() / new_var))) @ v.T)

    aw, bw = whiten(a), whiten(b)
    u, _, vt = np.linalg.svd(aw.T @ bw)
    ta, tb = aw @ u, bw @ vt.T
    return np.arccos(np.clip((ta * tb).sum() / (np.linalg.norm(ta) * np.linalg.norm(tb)), -1, 1))


def test_knn_family_against_platonic_definitions():
    xu, yu = _unit(X), _unit(Y)
    nx, ny = _neighbours(xu), _neighbours(yu)
    want_cycle = np.mean([i in nx[ny[i]] for i in range(len(X))])
    want_lcs = np.mean([_lcs(nx[i], ny[i]) for i in range(len(X))])
    assert sim.cycle_knn(X, Y, K, n_permutations=2)["score"] == pytest.approx(want_cycle, abs=1e-12)
    assert sim.lcs_knn(X, Y, K, n_permutations=2)["score"] == pytest.approx(want_lcs, abs=1e-12)
    assert sim.cknna(X, Y, K, n_permutations=2)["score"] == pytest.approx(_cknna(X, Y), rel=1e-9)
    assert sim.cknna(X, Y, K, n_permutations=2, eps=1e-6)["score"] == pytest.approx(_cknna(X, Y, 1e-6), rel=1e-9)
    assert sim.cknna(X, X, K, n_permutations=2)["score"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("alpha,pca", [(1.0, None), (0.5, None), (0.0, 5), (0.5, 5), (0.3, None)])
def test_shape_distances_against_netrep_definition(alpha, pca):
    got = sim.linear_shape_distance(X, Y, alpha, pca, n_permutations=2)["score"]
    assert got == pytest.approx(_netrep_angle(X, Y, alpha, pca), abs=1e-9)


def test_shape_distance_is_a_metric():
    q, _ = np.linalg.qr(RNG.normal(size=(10, 10)))
    assert sim.linear_shape_distance(X, 3.0 * X @ q + 2.0, 1.0, n_permutations=2)["score"] == pytest.approx(0, abs=1e-6)
    Z = RNG.normal(size=(80, 7)).astype(np.float32)
    d = lambda a, b: sim.linear_shape_distance(a, b, 0.5, n_permutations=2)["score"]  # noqa: E731
    assert d(X, Y) == pytest.approx(d(Y, X), abs=1e-9)
    assert d(X, Z) <= d(X, Y) + d(Y, Z) + 1e-9


@pytest.mark.parametrize("method,corr", [("spearman", spearmanr), ("pearson", pearsonr)])
def test_rsa_against_scipy(method, corr):
    want = corr(pdist(X, "cosine"), pdist(Y, "cosine"))[0]
    assert sim.rsa(X, Y, method, n_permutations=2)["score"] == pytest.approx(want, abs=1e-10)


def test_permutation_null_is_the_statistic_of_randomly_paired_rows():
    key = jax.random.key(3)
    perms = [np.asarray(jax.random.permutation(k, len(X))) for k in jax.random.split(key, 3)]
    want = {
        "cknna": [_cknna(X, Y[p]) for p in perms],
        "lcs_knn": [np.mean([_lcs(a, b) for a, b in zip(_neighbours(_unit(X)), _neighbours(_unit(Y[p])))])
                    for p in perms],
        "rsa": [spearmanr(pdist(X, "cosine"), pdist(Y[p], "cosine"))[0] for p in perms],
        "shape": [_netrep_angle(X, Y[p], 1.0) for p in perms],
    }
    got = {"cknna": sim.cknna(X, Y, K, 3, key), "lcs_knn": sim.lcs_knn(X, Y, K, 3, key),
           "rsa": sim.rsa(X, Y, "spearman", 3, key), "shape": sim.linear_shape_distance(X, Y, 1.0, None, 3, key)}
    for name, res in got.items():
        assert res["null_mean"] == pytest.approx(np.mean(want[name]), rel=1e-7, abs=1e-10), name
        assert res["null_std"] == pytest.approx(np.std(want[name]), rel=1e-5, abs=1e-10), name
        assert res["z"] == pytest.approx((res["score"] - res["null_mean"]) / res["null_std"]), name


def test_rbf_cka_accumulates_in_float64():
    def gram(a, gamma):
        d2 = np.maximum((a ** 2).sum(1)[:, None] + (a ** 2).sum(1)[None] - 2 * a @ a.T, 0)
        return np.exp(-gamma * d2), d2

    h = np.eye(len(X)) - 1 / len(X)
    for sigma in (None, 1.0):
        (k, dx), (l, dy) = gram(X, 1.0), gram(Y, 1.0)
        if sigma is None:  # median heuristic on all rows (N <= BANDWIDTH_SAMPLE)
            k, l = gram(X, 1 / (2 * np.median(dx)))[0], gram(Y, 1 / (2 * np.median(dy)))[0]
        else:
            k, l = gram(X, 1 / (2 * sigma ** 2))[0], gram(Y, 1 / (2 * sigma ** 2))[0]
        want = np.trace(k @ h @ l @ h) / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(l @ h @ l @ h))
        assert sim.rbf_cka(X, Y, block=32, sigma=sigma) == pytest.approx(want, abs=1e-12)


def test_platonic_convention_clips_then_normalises():
    heavy = X.copy()
    heavy[0, 0] = 50.0
    out = sim.preprocess(heavy, "platonic")
    per_row = []
    for row in np.abs(heavy):  # torch.quantile's linear interpolation, by hand
        s = np.sort(row)
        pos = 0.95 * (len(s) - 1)
        per_row.append(s[int(np.floor(pos))] + (pos - np.floor(pos)) * (s[int(np.ceil(pos))] - s[int(np.floor(pos))]))
    clipped = np.clip(heavy, -np.mean(per_row), np.mean(per_row))
    np.testing.assert_allclose(out, clipped / np.linalg.norm(clipped, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(sim.preprocess(heavy, "project"), heavy.astype(np.float32))
    platonic = sim.measure(X, Y, "rbf_cka", convention="platonic")["rbf_cka"]
    assert platonic == pytest.approx(sim.rbf_cka(sim.preprocess(X, "platonic"), sim.preprocess(Y, "platonic"),
                                                 sigma=1.0), abs=1e-12)


def test_measure_names_and_bad_input():
    out = sim.similarity(X, Y, ["cknna", "partial_whitening0.25_4", "cca_angle3", "rsa_pearson"], knn_k=K,
                         n_permutations=2)
    assert set(out) == {"cknna", "cknna_z", "partial_whitening0.25_4", "partial_whitening0.25_4_z", "cca_angle3",
                        "cca_angle3_z", "rsa_pearson", "rsa_pearson_z"}
    assert out["cca_angle3"] == pytest.approx(_netrep_angle(X, Y, 0.0, 3), abs=1e-9)
    with pytest.raises(LinalignError, match="unknown similarity measure"):
        sim.measure(X, Y, "cka_magic")
    with pytest.raises(LinalignError, match="convention"):
        sim.measure(X, Y, "cknna", convention="torch")
    with pytest.raises(LinalignError, match="alpha"):
        sim.linear_shape_distance(X, Y, 1.5)
    with pytest.raises(LinalignError, match="CKNNA needs 2 <= k"):
        sim.cknna(X, Y, 1)
    with pytest.raises(LinalignError, match="n_permutations"):
        sim.cycle_knn(X, Y, K, n_permutations=1)
