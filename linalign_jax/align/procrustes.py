"""Orthogonal Procrustes map: the best rotation (times one global scale) between centred feature sets.

A baseline against ridge that cannot distort geometry. Both sides are centred and the bias b = ȳ − x̄W carries the
means (without that, a rotation of uncentred embeddings is dominated by their common offset); `scale=True` fits the
global scale s = Σσ / ‖X̃‖²_F that minimises the residual (embeddings of different models rarely share a norm), and
`scale=False` keeps a pure rotation (s = 1) — the README reports both. When the dims differ, either
  * "zero": zero-pad the smaller side, which is the same as taking the semi-orthogonal W = U Vᵀ from the thin SVD of
    C_xy (all of the smaller space is kept), or
  * "pca": first project the larger side onto its top principal components, then solve a square Procrustes problem in
    that subspace.
"""
from __future__ import annotations

import numpy as np

from linalign_jax.align.maps import AffineMap
from linalign_jax.align.ridge import _check_pair
from linalign_jax.errors import LinalignError

DIM_MODES = ("zero", "pca")


def fit_procrustes(x: np.ndarray, y: np.ndarray, *, dims: str = "zero", scale: bool = True) -> tuple[AffineMap, dict]:
    """Fit y ≈ s·(x − x̄) W + ȳ with WᵀW = I (or WWᵀ = I); returns (map, info)."""
    if dims not in DIM_MODES:
        raise LinalignError(f"procrustes dims mode must be one of {DIM_MODES}, got {dims!r}")
    x, y = _check_pair(x, y)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise LinalignError("features contain NaN or Inf")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    dx, dy = x.shape[1], y.shape[1]
    # Projections onto the top principal directions of the larger side (identity when not needed).
    px = _top_components(xc, dy) if dims == "pca" and dx > dy else np.eye(dx)
    py = _top_components(yc, dx) if dims == "pca" and dy > dx else np.eye(dy)
    xr, yr = xc @ px, yc @ py
    u, sv, vt = np.linalg.svd(xr.T @ yr, full_matrices=False)
    rotation = u @ vt
    s = float(sv.sum() / max((xr ** 2).sum(), np.finfo(np.float64).tiny)) if scale else 1.0
    W = s * (px @ rotation @ py.T)
    b = my - mx @ W
    return (AffineMap(W=W.astype(np.float32), b=b.astype(np.float32)),
            {"method": "procrustes", "procrustes_dims": dims, "procrustes_scale": bool(scale), "scale": s})


def _top_components(xc: np.ndarray, k: int) -> np.ndarray:
    """[d, k] orthonormal top-k principal directions of centred rows."""
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return vt[:k].T
