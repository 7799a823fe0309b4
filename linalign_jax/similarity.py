"""Representational similarity between two feature sets of the same N inputs (paper §2.6, App. A).

* Linear CKA, biased and debiased (Kornblith et al. 2019; the unbiased HSIC of Song et al. 2012), in feature space:
  O(N d²) time, no N×N matrix at any N.
* RBF CKA (bandwidth = `threshold` × median pairwise distance, estimated on ≤ 2000 rows): accumulated over row blocks,
  so memory is O(block × N) — the N×N kernel is never held.
* SVCCA (Raghu et al. 2017): PCA to 64/128 dims, then CCA; mean canonical correlation on the fitting rows and,
  when given, on held-out rows projected with the fitted directions.
* Mutual kNN (Huh et al. 2024): mean overlap of the k-nearest-neighbour sets (cosine) in the two spaces.
  Neighbours come from blocked top-k; no N×N matrix is held.
* The other neighbourhood measures of platonic-rep (Huh et al. 2024, `metrics.py`), on the same neighbour lists:
  cycle-kNN (fraction of rows i that are among the X-neighbours of one of their own Y-neighbours), LCS-kNN (mean
  length of the longest common subsequence of the two rank-ordered k-neighbour lists, 0..k) and CKNNA (debiased HSIC
  of the two inner-product kernels restricted to the pairs that are k-nearest neighbours in both spaces, normalised
  like CKA; kept sparse, O(N k) memory).
* Shape metrics (Williams et al. 2021, netrep `LinearMetric(alpha)`): columns centred, each side partially whitened,
  X ↦ X V diag(α + (1 − α) λ^−½) Vᵀ with XᵀX = V diag(λ) Vᵀ (eigenvalues of the sums, clipped at 1e-7), then the
  angle arccos(‖X̃ᵀỸ‖_* / (‖X̃‖_F ‖Ỹ‖_F)) after the best rotation (the smaller side zero-padded). α = 1 is the
  Procrustes angular distance, α = 0 the CCA angular distance (arccos of the mean canonical correlation; after PCA to
  `dims` components per side, since full whitening of d ≈ N features fits noise). These are metrics: symmetric,
  zero on rotations of one another, and they obey the triangle inequality (what clustering / MDS over models needs).
  A distance, not a similarity: smaller = more alike, in radians, in [0, π/2].
* RSA (Kriegeskorte et al. 2008): Spearman or Pearson correlation between the upper triangles of the two cosine
  dissimilarity matrices 1 − cos(x_i, x_j). Holds N(N−1)/2 values per side, so N is capped (RSA_MAX_ROWS).
Every neighbourhood, shape and RSA measure comes with a permutation null — the same statistic with the rows of Y
paired at random — reported as its mean, std and z = (score − mean) / std (negative for the distances: smaller than
chance). A permuted pairing needs no new neighbour search or decomposition of either side alone.

Conventions (`convention=`): "project" uses the features as given (the binaries' --normalize L2-normalises them) and
the median heuristic for the RBF bandwidth. "platonic" reproduces platonic-rep's `prepare_features` + `compute_score`
before every measure: clip every entry at ± the mean over rows of each row's 0.95 quantile of |x|, then L2-normalise
rows; its RBF kernel uses σ = 1 on both sides and its CKNNA adds ε = 1e-6 to the denominator.
Sums that cancel (RBF CKA's Σ K∘L − 2/n k·l + ..., the HSIC terms) are accumulated in float64.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import re

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from scipy.stats import rankdata

from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import Progress

BLOCK = 1024
BANDWIDTH_SAMPLE = 2000
RSA_MAX_ROWS = 6000
CONVENTIONS = ("project", "platonic")
MEASURES = ("linear_cka", "linear_cka_debiased", "rbf_cka", "svcca64", "svcca128", "mutual_knn", "cknna",
            "cycle_knn", "lcs_knn", "procrustes_angle", "cca_angle64", "partial_whitening0.5_64", "rsa_spearman",
            "rsa_pearson")
#: measures that come with a permutation null (they also report "<measure>_z")
NULL_MEASURES = ("mutual_knn", "cknna", "cycle_knn", "lcs_knn", "procrustes_angle", "cca_angle", "partial_whitening",
                 "rsa_spearman", "rsa_pearson")


def _check(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise LinalignError(f"similarity needs [N, d] features of the same N: got {x.shape} and {y.shape}")
    if x.shape[0] < 4:
        raise LinalignError(f"similarity needs at least 4 rows, got N={x.shape[0]}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise LinalignError("features contain NaN or Inf")
    return x, y


# ------------------------------------------------------------------------------------------------------ linear CKA

@functools.partial(jax.jit, static_argnames="debiased")
def _linear_cka(x, y, debiased: bool):
    x = x - x.mean(0)
    y = y - y.mean(0)
    n = x.shape[0]
    xy = jnp.sum((x.T @ y) ** 2)
    xx = jnp.sum((x.T @ x) ** 2)
    yy = jnp.sum((y.T @ y) ** 2)
    if not debiased:
        return xy / jnp.sqrt(xx * yy)
    # Unbiased HSIC in feature space: tr(K̃L̃) terms corrected for the zeroed diagonals of the Gram matrices.
    rx, ry = jnp.sum(x * x, 1), jnp.sum(y * y, 1)
    sx, sy = rx.sum(), ry.sum()

    def unbiased(dot, ra, rb, sa, sb):
        return dot - n / (n - 2.0) * ra @ rb + sa * sb / ((n - 1.0) * (n - 2.0))

    return unbiased(xy, rx, ry, sx, sy) / jnp.sqrt(unbiased(xx, rx, rx, sx, sx) * unbiased(yy, ry, ry, sy, sy))


def linear_cka(x, y, debiased: bool = False) -> float:
    x, y = _check(x, y)
    return float(_linear_cka(x, y, debiased))


# --------------------------------------------------------------------------------------------------------- RBF CKA

def _median_sq_distance(x: np.ndarray) -> float:
    sample = x[np.linspace(0, len(x) - 1, min(len(x), BANDWIDTH_SAMPLE)).astype(int)].astype(np.float64)
    sq = (sample ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * sample @ sample.T, 0.0)
    return float(np.median(d2))


def rbf_cka(x, y, threshold: float = 1.0, block: int = BLOCK, sigma: float | None = None) -> float:
    """Biased RBF CKA, tr(KHLH)/√(tr(KHKH) tr(LHLH)), accumulated over row blocks in float64.

    Bandwidth: σ² = threshold² × median squared distance per side (Kornblith et al.), or the given `sigma` for both.
    """
    x, y = _check(x, y)
    n = x.shape[0]
    if sigma is None:
        gx = 1.0 / (2 * threshold ** 2 * max(_median_sq_distance(x), 1e-12))
        gy = 1.0 / (2 * threshold ** 2 * max(_median_sq_distance(y), 1e-12))
    else:
        gx = gy = 1.0 / (2 * float(sigma) ** 2)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    sqx, sqy = (x64 ** 2).sum(1), (y64 ** 2).sum(1)
    traces = np.zeros(3)
    k1, l1 = np.zeros(n), np.zeros(n)
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        k = np.exp(-gx * np.maximum(sqx[rows, None] + sqx[None] - 2 * x64[rows] @ x64.T, 0.0))
        l = np.exp(-gy * np.maximum(sqy[rows, None] + sqy[None] - 2 * y64[rows] @ y64.T, 0.0))
        traces += ((k * l).sum(), (k * k).sum(), (l * l).sum())
        k1[rows], l1[rows] = k.sum(1), l.sum(1)

    def centred(kl, a1, b1):  # tr(AHBH) from Σ A∘B, row sums and totals
        return kl - 2.0 / n * a1 @ b1 + a1.sum() * b1.sum() / n ** 2

    return float(centred(traces[0], k1, l1) / np.sqrt(centred(traces[1], k1, k1) * centred(traces[2], l1, l1)))


# ----------------------------------------------------------------------------------------------------------- SVCCA

@functools.partial(jax.jit, static_argnames="dims")
def _svcca_fit(x, y, dims: int):
    """PCA each side to `dims`, then CCA. Returns (canonical correlations, per-side (mean, projection))."""
    def reduce(a):
        mean = a.mean(0)
        _, s, vt = jnp.linalg.svd(a - mean, full_matrices=False)
        pcs = vt[:dims].T                         # [d, dims]
        u, s2, vt2 = jnp.linalg.svd((a - mean) @ pcs, full_matrices=False)
        whiten = vt2.T / s2                        # [dims, dims]: rows of u are the whitened PCA scores
        return u, mean, pcs @ whiten

    ux, mx, px = reduce(x)
    uy, my, py = reduce(y)
    a, corrs, bt = jnp.linalg.svd(ux.T @ uy, full_matrices=False)
    return corrs, (mx, px @ a), (my, py @ bt.T)


def _column_correlations(a, b) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.maximum(np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0), 1e-12)


def svcca(x, y, dims: int = 64, x_test=None, y_test=None) -> dict[str, float]:
    """{"train": mean canonical correlation, "test": the same directions on held-out rows (if given)}."""
    x, y = _check(x, y)
    k = min(dims, x.shape[1], y.shape[1], x.shape[0] - 1)
    corrs, (mx, ax), (my, ay) = _svcca_fit(x, y, k)
    out = {"train": float(np.mean(np.asarray(corrs))), "dims": k}
    if x_test is not None:
        xt, yt = _check(x_test, y_test)
        out["test"] = float(np.mean(_column_correlations(np.asarray((xt - mx) @ ax, np.float64),
                                                         np.asarray((yt - my) @ ay, np.float64))))
    return out


# ------------------------------------------------------------------------------------------------- conventions

def preprocess(x, convention: str = "project") -> np.ndarray:
    """Features as a measure sees them under `convention` (see the module docstring)."""
    if convention not in CONVENTIONS:
        raise LinalignError(f"unknown similarity convention {convention!r}; expected one of {CONVENTIONS}")
    x = np.asarray(x, np.float32)
    if convention == "project":
        return x
    x64 = x.astype(np.float64)
    bound = float(np.quantile(np.abs(x64), 0.95, axis=1).mean())  # platonic-rep remove_outliers(q=0.95, exact=False)
    clipped = np.clip(x64, -bound, bound)
    return (clipped / np.maximum(np.linalg.norm(clipped, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- permutation null

def permutation_null(statistic, n: int, score: float, n_permutations: int = 100, key: jax.Array | None = None
                     ) -> dict[str, float]:
    """{"score", "null_mean", "null_std", "z"}: `statistic(perm)` is the measure with Y's rows taken in order `perm`
    (row i of X paired with row perm[i] of Y); the same key gives the same permutations for every measure."""
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 2:
        raise LinalignError(f"the permutation null needs n_permutations >= 2, got {n_permutations!r}")
    key = jax.random.key(0) if key is None else key
    null = [statistic(np.asarray(jax.random.permutation(sub, n))) for sub in jax.random.split(key, n_permutations)]
    mean, std = float(np.mean(null)), float(np.std(null))
    return {"score": float(score), "null_mean": mean, "null_std": std, "z": (score - mean) / max(std, 1e-12)}


def _permuted_neighbours(ny: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Neighbour lists of Y[perm] from those of Y, in rank order: row i's are perm⁻¹(N_Y(perm(i)))."""
    return np.argsort(perm)[ny[perm]]


# ------------------------------------------------------------------------------------------ neighbourhood measures

@functools.partial(jax.jit, static_argnames="k")
def _knn_block(queries, keys, query_idx, k: int):
    scores = queries @ keys.T
    scores = scores.at[jnp.arange(queries.shape[0]), query_idx].set(-jnp.inf)  # a row is not its own neighbour
    return jax.lax.top_k(scores, k)[1]


def knn_indices(x, k: int, block: int = BLOCK, cosine: bool = True) -> np.ndarray:
    """[N, k] indices of each row's k nearest other rows, most similar first, by cosine similarity (or by inner
    product, cosine=False, as platonic-rep's CKNNA ranks them), computed in row blocks."""
    x = np.asarray(x, np.float32)
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if cosine else x
    keys = jnp.asarray(xn, jnp.float32)
    n = len(x)
    out = np.empty((n, k), np.int64)
    for start in range(0, n, block):
        idx = np.minimum(np.arange(start, start + block), n - 1)
        rows = np.asarray(_knn_block(keys[idx], keys, jnp.asarray(idx), k))
        out[start:start + block] = rows[: min(block, n - start)]
    return out


def _check_k(k: int, n: int, name: str, low: int = 1) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not low <= k < n:
        raise LinalignError(f"{name} needs {low} <= k < N={n}, got k={k!r}")


def _overlap(nx: np.ndarray, ny: np.ndarray) -> float:
    return float((nx[:, :, None] == ny[:, None, :]).any(-1).mean())


def _neighbour_measure(statistic, name: str, x, y, k: int, n_permutations: int, key: jax.Array | None
                       ) -> dict[str, float]:
    """`statistic(N_X, N_Y)` of the cosine k-neighbour lists, with its permutation null."""
    x, y = _check(x, y)
    _check_k(k, x.shape[0], name)
    nx, ny = knn_indices(x, k), knn_indices(y, k)
    return {**permutation_null(lambda p: statistic(nx, _permuted_neighbours(ny, p)), len(x), statistic(nx, ny),
                               n_permutations, key), "k": k}


def mutual_knn(x, y, k: int = 10, n_permutations: int = 100, key: jax.Array | None = None) -> dict[str, float]:
    """{"score", "null_mean", "null_std", "z", "k"}: mean over rows of |N_X(i) ∩ N_Y(i)| / k."""
    return _neighbour_measure(_overlap, "mutual kNN", x, y, k, n_permutations, key)


def _cycle(nx: np.ndarray, ny: np.ndarray) -> float:
    rows = np.arange(len(nx))[:, None, None]
    return float((nx[ny] == rows).any(axis=(1, 2)).mean())


def cycle_knn(x, y, k: int = 10, n_permutations: int = 100, key: jax.Array | None = None) -> dict[str, float]:
    """Fraction of rows i found among the X-neighbours of some Y-neighbour of i (platonic-rep `cycle_knn`: i → its
    k Y-neighbours j → their k X-neighbours; not symmetric in X and Y)."""
    return _neighbour_measure(_cycle, "cycle kNN", x, y, k, n_permutations, key)


def _lcs(nx: np.ndarray, ny: np.ndarray) -> float:
    """Mean over rows of the longest-common-subsequence length of the rank-ordered lists (dynamic programming,
    vectorised over rows)."""
    n, k = nx.shape
    prev = np.zeros((n, k + 1), np.int32)
    for i in range(k):
        cur = np.zeros((n, k + 1), np.int32)
        match = nx[:, i:i + 1] == ny
        for j in range(k):
            cur[:, j + 1] = np.where(match[:, j], prev[:, j] + 1, np.maximum(prev[:, j + 1], cur[:, j]))
        prev = cur
    return float(prev[:, k].mean())


def lcs_knn(x, y, k: int = 10, n_permutations: int = 100, key: jax.Array | None = None) -> dict[str, float]:
    """Mean length (0..k) of the longest common subsequence of each row's rank-ordered k-neighbour lists."""
    return _neighbour_measure(_lcs, "LCS kNN", x, y, k, n_permutations, key)


def _sparse_hsic_unbiased(a: scipy.sparse.csr_matrix, b: scipy.sparse.csr_matrix) -> float:
    """Song et al. (2012) unbiased HSIC of two zero-diagonal N×N matrices (not necessarily symmetric):
    [tr(AB) + 1ᵀA1·1ᵀB1 / ((N−1)(N−2)) − 2/(N−2)·1ᵀAB1] / (N(N−3)), in float64."""
    m = a.shape[0]
    trace = float(a.multiply(b.T).sum())
    ab = float(np.asarray(a.sum(0)).ravel() @ np.asarray(b.sum(1)).ravel())
    return (trace + float(a.sum()) * float(b.sum()) / ((m - 1) * (m - 2)) - 2.0 * ab / (m - 2)) / (m * (m - 3))


def _masked_kernel(values: np.ndarray, neighbours: np.ndarray, keep: np.ndarray) -> scipy.sparse.csr_matrix:
    """The N×N matrix holding values[i, s] at (i, neighbours[i, s]) where keep[i, s], zero elsewhere."""
    n = len(neighbours)
    rows = np.broadcast_to(np.arange(n)[:, None], neighbours.shape)
    return scipy.sparse.csr_matrix((values[keep], (rows[keep], neighbours[keep])), shape=(n, n))


def _pair_dots(a: np.ndarray, neighbours: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """[N, k] inner products a[o(i)] · a[o(neighbours[i, s])] (o = order, identity if None), float64."""
    if order is None:
        return np.einsum("nd,nkd->nk", a, a[neighbours])
    return np.einsum("nd,nkd->nk", a[order], a[order[neighbours]])


def cknna(x, y, k: int = 10, n_permutations: int = 100, key: jax.Array | None = None, eps: float = 0.0
          ) -> dict[str, float]:
    """CKNNA (platonic-rep `cknna`, unbiased): with K = XXᵀ, L = YYᵀ and N_K(i), N_L(i) each row's k nearest other
    rows by inner product, S(K, L) = HSIC_unbiased(M∘K, M∘L), M_ij = [j ∈ N_K(i) ∩ N_L(i)];
    score = S(K, L) / (√(S(K, K) S(L, L)) + eps). Only the ≤ N·k kept pairs are ever stored."""
    x, y = _check(x, y)
    _check_k(k, x.shape[0], "CKNNA", low=2)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    nx, ny = knn_indices(x, k, cosine=False), knn_indices(y, k, cosine=False)
    kx = _pair_dots(x64, nx)  # K at each row's X-neighbours
    everywhere = np.ones(nx.shape, bool)
    self_x = _sparse_hsic_unbiased(*(2 * [_masked_kernel(kx, nx, everywhere)]))
    self_y = _sparse_hsic_unbiased(*(2 * [_masked_kernel(_pair_dots(y64, ny), ny, everywhere)]))
    denominator = np.sqrt(self_x * self_y) + eps

    def cross(order: np.ndarray | None) -> float:
        ny_p = ny if order is None else _permuted_neighbours(ny, order)
        keep = (nx[:, :, None] == ny_p[:, None, :]).any(-1)  # X-neighbours that are Y-neighbours too
        ly = _pair_dots(y64, nx, order)                      # L (of Y[order]) at the same pairs
        return _sparse_hsic_unbiased(_masked_kernel(kx, nx, keep), _masked_kernel(ly, nx, keep)) / denominator

    return {**permutation_null(cross, len(x), cross(None), n_permutations, key), "k": k}


# --------------------------------------------------------------------------------------------------- shape metrics

def _partial_whiten(x: np.ndarray, alpha: float, pca_dims: int | None) -> np.ndarray:
    """Centred, optionally PCA-reduced, then X V diag(α + (1 − α) λ^−½) Vᵀ (netrep's `whiten` without its variance
    rescaling, which cancels in the angle)."""
    xc = x - x.mean(0)
    if pca_dims is not None:
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        xc = xc @ vt[:pca_dims].T
    if alpha >= 1.0 - 1e-7:
        return xc
    lam, v = np.linalg.eigh(xc.T @ xc)
    lam = np.maximum(lam, 1e-7)
    return xc @ ((v * (alpha + (1.0 - alpha) * lam ** -0.5)) @ v.T)


def _angle(xw: np.ndarray, yw: np.ndarray) -> float:
    nuclear = np.linalg.svd(xw.T @ yw, compute_uv=False).sum()
    return float(np.arccos(np.clip(nuclear / (np.linalg.norm(xw) * np.linalg.norm(yw)), -1.0, 1.0)))


def linear_shape_distance(x, y, alpha: float = 1.0, pca_dims: int | None = None, n_permutations: int = 100,
                          key: jax.Array | None = None) -> dict[str, float]:
    """netrep `LinearMetric(alpha, center_columns=True, zero_pad=True, score_method="angular")` fitted and scored on
    the same rows: angle in radians after centring, partial whitening (α ∈ [0, 1]) and the best rotation."""
    x, y = _check(x, y)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise LinalignError(f"partial-whitening alpha must be in [0, 1], got {alpha!r}")
    if pca_dims is not None:
        if isinstance(pca_dims, bool) or not isinstance(pca_dims, int) or not 1 <= pca_dims <= min(
                x.shape[1], y.shape[1], x.shape[0] - 1):
            raise LinalignError(f"pca_dims must be in [1, min(dims, N − 1)], got {pca_dims!r}")
    xw = _partial_whiten(x.astype(np.float64), float(alpha), pca_dims)
    yw = _partial_whiten(y.astype(np.float64), float(alpha), pca_dims)
    return {**permutation_null(lambda p: _angle(xw, yw[p]), len(x), _angle(xw, yw), n_permutations, key),
            "alpha": float(alpha)}


# ------------------------------------------------------------------------------------------------------------ RSA

def _rdm_upper(x: np.ndarray) -> np.ndarray:
    """The N×N cosine dissimilarity matrix 1 − cos(x_i, x_j), float64."""
    x = x.astype(np.float64)
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return 1.0 - xn @ xn.T


def rsa(x, y, method: str = "spearman", n_permutations: int = 100, key: jax.Array | None = None
        ) -> dict[str, float]:
    """Correlation (Spearman: of the ranks; Pearson: of the values) between the upper triangles (i < j) of the two
    cosine dissimilarity matrices."""
    x, y = _check(x, y)
    if method not in ("spearman", "pearson"):
        raise LinalignError(f"RSA method must be 'spearman' or 'pearson', got {method!r}")
    n = x.shape[0]
    if n > RSA_MAX_ROWS:
        raise LinalignError(f"RSA holds N(N−1)/2 dissimilarities per side; N={n} > {RSA_MAX_ROWS}: use fewer rows "
                            "(--limit)")
    upper = np.triu_indices(n, 1)
    dx, dy = _rdm_upper(x), _rdm_upper(y)
    if method == "spearman":  # ranks of the upper triangle, written back symmetrically so permutations can gather
        for d in (dx, dy):
            d[upper] = rankdata(d[upper])
            d.T[upper] = d[upper]
    a = dx[upper]
    a = (a - a.mean()) / np.linalg.norm(a - a.mean())

    def corr(order: np.ndarray | None) -> float:
        b = dy[upper] if order is None else dy[order[upper[0]], order[upper[1]]]
        b = b - b.mean()
        return float(a @ b / np.linalg.norm(b))

    return {**permutation_null(corr, n, corr(None), n_permutations, key), "method": method}


# ----------------------------------------------------------------------------------------------------------- matrix

_SHAPE = re.compile(r"^(procrustes_angle|cca_angle(\d+)|partial_whitening(\d*\.?\d+)(?:_(\d+))?)$")


KNN_MEASURES = ("mutual_knn", "cycle_knn", "lcs_knn", "cknna")


def check_measures(names: Sequence[str]) -> None:
    """Raise a LinalignError naming every measure name `measure` would not know."""
    unknown = [m for m in names if not (m in MEASURES or m in ("linear_cka", "linear_cka_debiased", "rbf_cka")
                                        or re.fullmatch(r"svcca\d+", m) or _SHAPE.match(m))]
    if unknown:
        raise LinalignError(f"unknown similarity measure(s) {unknown}; known: {', '.join(MEASURES)} (svcca<dims>, "
                            "cca_angle<dims>, partial_whitening<alpha>[_<dims>] take any value)")


def measure(x, y, name: str, key: jax.Array | None = None, knn_k: int = 10, n_permutations: int = 100,
            convention: str = "project") -> dict[str, float]:
    """One measure on one pair under `convention`: {name: value} plus {name + "_z": z} for the NULL_MEASURES.

    Names: linear_cka, linear_cka_debiased, rbf_cka, svcca<dims>, mutual_knn, cknna, cycle_knn, lcs_knn,
    procrustes_angle (α = 1, all dims), cca_angle<dims> (α = 0 after PCA to dims), partial_whitening<α>[_<dims>]
    (after PCA to dims when given), rsa_spearman, rsa_pearson.
    """
    x, y = preprocess(x, convention), preprocess(y, convention)
    platonic = convention == "platonic"
    null = {"key": key, "n_permutations": n_permutations}
    shape = _SHAPE.match(name)
    if name == "linear_cka":
        return {name: linear_cka(x, y)}
    if name == "linear_cka_debiased":
        return {name: linear_cka(x, y, debiased=True)}
    if name == "rbf_cka":
        return {name: rbf_cka(x, y, sigma=1.0 if platonic else None)}
    if re.fullmatch(r"svcca\d+", name):
        return {name: svcca(x, y, dims=int(name[5:]))["train"]}
    if name in ("mutual_knn", "cycle_knn", "lcs_knn", "cknna"):
        fn = {"mutual_knn": mutual_knn, "cycle_knn": cycle_knn, "lcs_knn": lcs_knn, "cknna": cknna}[name]
        res = fn(x, y, k=knn_k, **null, **({"eps": 1e-6 if platonic else 0.0} if name == "cknna" else {}))
    elif shape:
        alpha = 1.0 if name == "procrustes_angle" else 0.0 if shape.group(2) else float(shape.group(3))
        dims = shape.group(2) or shape.group(4)
        if dims:  # like svcca: never more components than the rows and both sides support
            dims = min(int(dims), x.shape[1], y.shape[1], x.shape[0] - 1)
        res = linear_shape_distance(x, y, alpha, dims or None, **null)
    elif name in ("rsa_spearman", "rsa_pearson"):
        res = rsa(x, y, name[4:], **null)
    else:
        check_measures([name])
        raise AssertionError(name)  # check_measures knows every name handled above
    return {name: res["score"], f"{name}_z": res["z"]}


def similarity(x, y, measures: Sequence[str] = MEASURES, key: jax.Array | None = None, knn_k: int = 10,
               n_permutations: int = 100, convention: str = "project") -> dict[str, float]:
    """Every requested measure for one pair; the measures with a permutation null also give "<measure>_z"."""
    out: dict[str, float] = {}
    for m in measures:
        out.update(measure(x, y, m, key, knn_k, n_permutations, convention))
    return out


def similarity_matrices(features: Mapping[str, np.ndarray], measures: Sequence[str] = MEASURES,
                        key: jax.Array | None = None, knn_k: int = 10, n_permutations: int = 100,
                        convention: str = "project", symmetric: bool = True) -> dict[str, np.ndarray]:
    """{measure: [M, M] matrix} over every pair of named feature sets (same N rows); the diagonal is computed too,
    except the z-scores', which stay NaN: a set against itself has no permutation null worth a z-score.
    symmetric=False computes both (i, j) and (j, i) (cycle-kNN is not symmetric)."""
    return cross_similarity(features, features, measures, key, knn_k, n_permutations, convention,
                            same_sets=True, symmetric=symmetric)


def cross_similarity(rows: Mapping[str, np.ndarray], cols: Mapping[str, np.ndarray],
                     measures: Sequence[str] = MEASURES, key: jax.Array | None = None, knn_k: int = 10,
                     n_permutations: int = 100, convention: str = "project", same_sets: bool = False,
                     symmetric: bool = False) -> dict[str, np.ndarray]:
    """{measure: [R, C] matrix} of measure(rows[i], cols[j]) — e.g. every layer of one model against every layer of
    another. With same_sets (rows is cols), symmetric measures are computed once per unordered pair."""
    row_names, col_names = list(rows), list(cols)
    pairs = [(i, j) for i in range(len(row_names)) for j in range(len(col_names))
             if not (same_sets and symmetric and j < i)]
    mats: dict[str, np.ndarray] = {}
    progress = Progress("similarity pairs", total=len(pairs), unit="pairs")
    for i, j in pairs:
        for m, v in similarity(rows[row_names[i]], cols[col_names[j]], measures, key, knn_k, n_permutations,
                               convention).items():
            if same_sets and i == j and m.endswith("_z"):
                continue
            mats.setdefault(m, np.full((len(row_names), len(col_names)), np.nan))[i, j] = v
            if same_sets and symmetric:
                mats[m][j, i] = v
        progress.update()
    progress.close()
    return mats
