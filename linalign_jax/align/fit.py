"""One entry point for every map method, so experiments name a method instead of calling four fitters."""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from linalign_jax.align.maps import AffineMap
from linalign_jax.align.optax_map import OptaxMapConfig, fit_optax_map
from linalign_jax.align.procrustes import fit_procrustes
from linalign_jax.align.ridge import RidgeStats, accumulate_stats, cv_lambda, fold_statistics, iterate_batches, \
    merge_stats, solve_reduced_rank, solve_ridge
from linalign_jax.errors import LinalignError

METHODS = ("ridge", "rrr", "procrustes", "optax")


@dataclasses.dataclass(frozen=True)
class MapConfig:
    method: str = "ridge"
    ridge_lambda: float | str = "auto"   # a float > 0, "auto" (GCV) or "cv" (k-fold CV, ridge/rrr on rows)
    cv_folds: int = 5
    rank: int = 64                      # rrr only
    procrustes_dims: str = "zero"       # procrustes only: "zero" | "pca"
    procrustes_scale: bool = True       # procrustes only: one global scale (False: a pure rotation)
    optax: OptaxMapConfig = OptaxMapConfig()
    batch_size: int = 8192              # rows per streamed statistics batch (ridge, rrr)

    def __post_init__(self):
        if self.method not in METHODS:
            raise LinalignError(f"unknown map method {self.method!r}; known: {METHODS}")
        if self.ridge_lambda not in ("auto", "cv") and not (
                isinstance(self.ridge_lambda, (int, float)) and not isinstance(self.ridge_lambda, bool)
                and np.isfinite(self.ridge_lambda) and self.ridge_lambda > 0):
            raise LinalignError(f"ridge lambda must be a finite float > 0, 'auto' or 'cv', got {self.ridge_lambda!r}")


def ridge_statistics(x: np.ndarray, y: np.ndarray, config: MapConfig, mesh=None) -> RidgeStats:
    return accumulate_stats(iterate_batches(x, y, config.batch_size), mesh=mesh)


def fit_map(x: np.ndarray, y: np.ndarray, config: MapConfig, key: jax.Array | None = None, *,
            base_stats: RidgeStats | None = None, mesh=None) -> tuple[AffineMap, dict]:
    """Fit source x [N, ds] -> target y [N, dt]. `base_stats` (ridge/rrr) are statistics of rows fitted *in addition*
    to (x, y) — e.g. a public corpus reused across seeds while only the in-distribution shots change."""
    if config.method in ("ridge", "rrr"):
        lam, cv_info = config.ridge_lambda, {}
        if lam == "cv":
            if base_stats is not None:
                raise LinalignError("ridge_lambda='cv' needs every fitted row; pass them all instead of base_stats")
            folds = fold_statistics(x, y, config.cv_folds, config.batch_size)
            stats = functools.reduce(merge_stats, folds)
            lam, cv_info = cv_lambda(folds, stats)
        else:
            stats = ridge_statistics(x, y, config, mesh)
            if base_stats is not None:
                stats = merge_stats(base_stats, stats)
        if config.method == "ridge":
            affine, info = solve_ridge(stats, lam)
        else:
            affine, info = solve_reduced_rank(stats, config.rank, lam)
        return affine, {**info, **cv_info}
    if base_stats is not None:
        raise LinalignError(f"base_stats only combine with ridge/rrr, not {config.method!r}")
    if config.method == "procrustes":
        return fit_procrustes(x, y, dims=config.procrustes_dims, scale=config.procrustes_scale)
    if key is None:
        raise LinalignError("the optax map needs a PRNG key")
    return fit_optax_map(x, y, key, config.optax, mesh=mesh)
