"""Unsupervised linear alignment, for when no paired public set exists (in the spirit of mini-vec2vec, Dar et al.
2025, arXiv 2510.02348): the two models embed DIFFERENT texts of the same kind; no row of one is known to match a row
of the other.

1. Each side is centred and reduced to r = min(d_s, d_t, max_dims) principal components.
2. Anchors: k-means centroids on each side (Euclidean, k-means++ starts, the best of `kmeans_inits`). The two sets of centroids are matched by their relative geometry alone:
   an initial assignment from each centroid's sorted similarity profile (a permutation-invariant signature), then
   graph-matching sweeps π ← argmax_π Σ_ik G_s[i, k] G_t[π(i), π(k)] (one linear assignment per sweep, G = the
   centroids' cosine Gram matrices), from several random restarts; the best-scoring matching is kept.
3. Pseudo-pairs: every row is described by its cosine similarities to its side's anchors (relative
   representations, Moschella et al. 2023) in matched order; mutual nearest neighbours across the two sides in that
   description are the pseudo-pairs.
4. Orthogonal Procrustes on the L2-normalised pseudo-pairs, then refinement: map, take mutual nearest neighbours by
   cosine in the target space, refit; `refine_steps` times; finally one global scale fitted on the last pairs.
The result is an affine map on raw features (the centring, PCA and scale folded into W and b), judged by held-out
retrieval and task accuracy like any other map.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linear_sum_assignment

from linalign_jax.align.maps import AffineMap
from linalign_jax.errors import LinalignError


@dataclasses.dataclass(frozen=True)
class UnsupervisedConfig:
    anchors: int = 32
    kmeans_steps: int = 30
    kmeans_inits: int = 3
    restarts: int = 20
    matching_sweeps: int = 30
    refine_steps: int = 10
    max_dims: int = 256

    def __post_init__(self):
        for name in ("anchors", "kmeans_steps", "kmeans_inits", "restarts", "matching_sweeps", "max_dims"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LinalignError(f"unsupervised alignment {name} must be an int >= 1, got {value!r}")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise LinalignError(f"refine_steps must be an int >= 0, got {self.refine_steps!r}")


def _normalize(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _reduce(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, [d, dims] principal directions, centred reduced rows)."""
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:dims].T
    return mean, basis, (x - mean) @ basis


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x ** 2).sum(1)[:, None] + (c ** 2).sum(1)[None] - 2 * x @ c.T, 0.0)


def _kmeans(x: np.ndarray, k: int, steps: int, inits: int, rng: np.random.Generator) -> np.ndarray:
    """Euclidean k-means (k-means++ starts, the lowest-inertia of `inits` runs); centroids [k, d]."""
    best = (np.inf, None)
    for _ in range(inits):
        centres = x[[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = _sq_dist(x, centres).min(1)
            centres = np.vstack([centres, x[rng.choice(len(x), p=d2 / d2.sum() if d2.sum() > 0 else None)]])
        for _ in range(steps):
            assign = _sq_dist(x, centres).argmin(1)
            centres = np.stack([x[assign == c].mean(0) if (assign == c).any() else centres[c] for c in range(k)])
        inertia = float(_sq_dist(x, centres).min(1).sum())
        if inertia < best[0]:
            best = (inertia, centres)
    return best[1]


def match_anchors(cs: np.ndarray, ct: np.ndarray, config: UnsupervisedConfig, rng: np.random.Generator
                  ) -> tuple[np.ndarray, float]:
    """π with source centroid i ↔ target centroid π[i], from the centroids' Gram matrices only; and its score."""
    cs, ct = _normalize(cs), _normalize(ct)
    gs, gt = cs @ cs.T, ct @ ct.T
    np.fill_diagonal(gs, 0.0)
    np.fill_diagonal(gt, 0.0)
    k = len(cs)

    def sweep(perm):
        for _ in range(config.matching_sweeps):
            gain = gs @ gt[:, perm].T  # gain[i, j] = Σ_k G_s[i, k] G_t[j, π(k)]
            new = linear_sum_assignment(-gain)[1]
            if np.array_equal(new, perm):
                break
            perm = new
        return perm, float((gs * gt[np.ix_(perm, perm)]).sum())

    signature_s, signature_t = np.sort(gs, axis=1), np.sort(gt, axis=1)
    start = linear_sum_assignment(((signature_s[:, None] - signature_t[None]) ** 2).sum(-1))[1]
    best = sweep(start)
    for _ in range(config.restarts - 1):
        candidate = sweep(rng.permutation(k))
        if candidate[1] > best[1]:
            best = candidate
    return best


def _mutual_nn(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = a @ b.T
    ab, ba = sims.argmax(1), sims.argmax(0)
    keep = np.flatnonzero(ba[ab] == np.arange(len(a)))
    return keep, ab[keep]


def _procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(a.T @ b)
    return u @ vt


def fit_unsupervised(x: np.ndarray, y: np.ndarray, config: UnsupervisedConfig = UnsupervisedConfig(),
                     seed: int = 0) -> tuple[AffineMap, dict]:
    """Map source rows x [N_s, d_s] to target space from unpaired target rows y [N_t, d_t]. Returns (map, info)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise LinalignError(f"unsupervised alignment needs [N, d] features, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise LinalignError("features contain NaN or Inf")
    if min(len(x), len(y)) < 4 * config.anchors:
        raise LinalignError(f"unsupervised alignment with {config.anchors} anchors needs >= {4 * config.anchors} rows "
                            f"per side, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    dims = min(x.shape[1], y.shape[1], config.max_dims, len(x) - 1, len(y) - 1)
    mx, px, xr = _reduce(x, dims)
    my, py, yr = _reduce(y, dims)
    cs = _kmeans(xr, config.anchors, config.kmeans_steps, config.kmeans_inits, rng)
    ct = _kmeans(yr, config.anchors, config.kmeans_steps, config.kmeans_inits, rng)
    perm, score = match_anchors(cs, ct, config, rng)
    xn, yn = _normalize(xr), _normalize(yr)
    rel_x = _normalize(_standardize(xn @ _normalize(cs).T))
    rel_y = _normalize(_standardize(yn @ _normalize(ct[perm]).T))
    src, tgt = _mutual_nn(rel_x, rel_y)
    rotation = _procrustes(xn[src], yn[tgt])
    pairs = [len(src)]
    for _ in range(config.refine_steps):
        src, tgt = _mutual_nn(xn @ rotation, yn)
        rotation = _procrustes(xn[src], yn[tgt])
        pairs.append(len(src))
    a, b = xr[src], yr[tgt]
    scale = float(np.trace(rotation.T @ a.T @ b) / max((a ** 2).sum(), np.finfo(np.float64).tiny))
    W = scale * px @ rotation @ py.T
    b = my - mx @ W
    return (AffineMap(W=W.astype(np.float32), b=b.astype(np.float32)),
            {"method": "unsupervised", **dataclasses.asdict(config), "dims": int(dims), "anchor_score": score,
             "pseudo_pairs": pairs, "scale": scale})


def _standardize(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(0)) / np.maximum(a.std(0), 1e-12)
