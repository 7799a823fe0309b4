"""Representational similarity between two feature sets of the same N inputs (paper §2.6, App. A).

* Linear CKA, biased and debiased (Kornblith et al. 2019; the unbiased HSIC of Song et al. 2012), in feature space:
  O(N d²) time, no N×N matrix at any N.
* RBF CKA (bandwidth = `threshold` × median pairwise distance, estimated on ≤ 2000 rows): accumulated over row blocks,
  so memory is O(block × N) — the N×N kernel is never held.
* SVCCA (Raghu et al. 2017): PCA to 64/128 dims, then CCA; mean canonical correlation on the fitting rows and,
  when given, on held-out rows projected with the fitted directions.
* Mutual kNN (Huh et al. 2024): mean overlap of the k-nearest-neighbour sets (cosine) in the two spaces, with a
  permutation null (pairing rows at random), reported as mean, std and a z-score. Neighbours come from blocked top-k.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import Progress

BLOCK = 1024
BANDWIDTH_SAMPLE = 2000
MEASURES = ("linear_cka", "linear_cka_debiased", "rbf_cka", "svcca64", "svcca128", "mutual_knn")


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


@jax.jit
def _rbf_block(xb, yb, mask, x, y, gx, gy):
    """Σ K∘L, Σ K∘K, Σ L∘L over the block's rows and the block's row sums of K and L."""
    def kernel(a, full, gamma):
        d2 = jnp.sum(a * a, 1)[:, None] + jnp.sum(full * full, 1)[None] - 2 * a @ full.T
        return jnp.exp(-gamma * jnp.maximum(d2, 0.0)) * mask[:, None]

    k, l = kernel(xb, x, gx), kernel(yb, y, gy)
    return jnp.stack([jnp.sum(k * l), jnp.sum(k * k), jnp.sum(l * l)]), k.sum(1), l.sum(1)


def rbf_cka(x, y, threshold: float = 1.0, block: int = BLOCK) -> float:
    """Biased RBF CKA, tr(KHLH)/√(tr(KHKH) tr(LHLH)), accumulated over row blocks."""
    x, y = _check(x, y)
    n = x.shape[0]
    gx = 1.0 / (2 * threshold ** 2 * max(_median_sq_distance(x), 1e-12))
    gy = 1.0 / (2 * threshold ** 2 * max(_median_sq_distance(y), 1e-12))
    block = min(block, n)
    traces = np.zeros(3)
    k1, l1 = np.zeros(n), np.zeros(n)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    for start in range(0, n, block):
        idx = np.arange(start, start + block)
        mask = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        t, kb, lb = _rbf_block(xj[idx], yj[idx], mask, xj, yj, gx, gy)
        traces += np.asarray(t, np.float64)
        valid = slice(0, min(block, n - start))
        k1[start:start + block] = np.asarray(kb, np.float64)[valid]
        l1[start:start + block] = np.asarray(lb, np.float64)[valid]

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


# ------------------------------------------------------------------------------------------------------ mutual kNN

@functools.partial(jax.jit, static_argnames="k")
def _knn_block(queries, keys, query_idx, k: int):
    scores = queries @ keys.T
    scores = scores.at[jnp.arange(queries.shape[0]), query_idx].set(-jnp.inf)  # a row is not its own neighbour
    return jax.lax.top_k(scores, k)[1]


def knn_indices(x, k: int, block: int = BLOCK) -> np.ndarray:
    """[N, k] indices of each row's k nearest other rows by cosine similarity, computed in row blocks."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    keys = jnp.asarray(xn, jnp.float32)
    n = len(x)
    out = np.empty((n, k), np.int64)
    for start in range(0, n, block):
        idx = np.minimum(np.arange(start, start + block), n - 1)
        rows = np.asarray(_knn_block(keys[idx], keys, jnp.asarray(idx), k))
        out[start:start + block] = rows[: min(block, n - start)]
    return out


def _overlap(nx: np.ndarray, ny: np.ndarray) -> float:
    return float((nx[:, :, None] == ny[:, None, :]).any(-1).mean())


def mutual_knn(x, y, k: int = 10, n_permutations: int = 100, key: jax.Array | None = None) -> dict[str, float]:
    """{"score", "null_mean", "null_std", "z"}: kNN-set overlap and its distribution under random row pairings.

    A permuted pairing needs no new search: the neighbours of row i in Y[π] are π⁻¹(N_Y(π(i))).
    """
    x, y = _check(x, y)
    if not 1 <= k < x.shape[0]:
        raise LinalignError(f"mutual kNN needs 1 <= k < N={x.shape[0]}, got k={k}")
    nx, ny = knn_indices(x, k), knn_indices(y, k)
    score = _overlap(nx, ny)
    key = jax.random.key(0) if key is None else key
    null = []
    for sub in jax.random.split(key, n_permutations):
        perm = np.asarray(jax.random.permutation(sub, x.shape[0]))
        inverse = np.argsort(perm)
        null.append(_overlap(nx, inverse[ny[perm]]))
    mean, std = float(np.mean(null)), float(np.std(null))
    return {"score": score, "null_mean": mean, "null_std": std, "z": (score - mean) / max(std, 1e-12), "k": k}


# ----------------------------------------------------------------------------------------------------------- matrix

def similarity(x, y, measures: Sequence[str] = MEASURES, key: jax.Array | None = None, knn_k: int = 10
               ) -> dict[str, float]:
    """Every requested measure for one pair; mutual kNN (`knn_k` neighbours) contributes its score and z."""
    out: dict[str, float] = {}
    for m in measures:
        if m == "linear_cka":
            out[m] = linear_cka(x, y)
        elif m == "linear_cka_debiased":
            out[m] = linear_cka(x, y, debiased=True)
        elif m == "rbf_cka":
            out[m] = rbf_cka(x, y)
        elif m in ("svcca64", "svcca128"):
            out[m] = svcca(x, y, dims=int(m[5:]))["train"]
        elif m == "mutual_knn":
            res = mutual_knn(x, y, k=knn_k, key=key)
            out[m], out["mutual_knn_z"] = res["score"], res["z"]
        else:
            raise LinalignError(f"unknown similarity measure {m!r}; known: {MEASURES}")
    return out


def similarity_matrices(features: Mapping[str, np.ndarray], measures: Sequence[str] = MEASURES,
                        key: jax.Array | None = None, knn_k: int = 10) -> dict[str, np.ndarray]:
    """{measure: [M, M] matrix} over every pair of named feature sets (same N rows); the diagonal is computed too,
    except mutual_knn_z's, which stays NaN: a model against itself has no permutation null worth a z-score."""
    names = list(features)
    size = len(names)
    pairs = [(i, j) for i in range(size) for j in range(i, size)]
    mats: dict[str, np.ndarray] = {}
    progress = Progress("similarity pairs", total=len(pairs), unit="pairs")
    for i, j in pairs:
        for m, v in similarity(features[names[i]], features[names[j]], measures, key, knn_k).items():
            if m == "mutual_knn_z" and i == j:
                continue
            mats.setdefault(m, np.full((size, size), np.nan))[i, j] = v
            mats[m][j, i] = v
        progress.update()
    progress.close()
    return mats
