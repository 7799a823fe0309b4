"""Closed-form ridge map from streamed sufficient statistics (paper §2.2), with λ chosen by GCV.

The data never has to fit in memory: each batch contributes the shifted sums Σx, Σy, XᵀX, XᵀY, Σy² to a
`RidgeStats`, and statistics merge by addition (after re-basing to a common shift), so batches, devices and processes
reduce the same way. Working with rows shifted by a reference point (the first batch's mean) keeps the float32 batch
Gram accurate when embeddings have a large common offset; the running totals are host float64.

    W* = (C_xx + λI)⁻¹ C_xy,   b* = ȳ − x̄ W*,   C = centred second moments.

λ = "auto" picks the generalised-cross-validation minimiser over a log grid scaled by the mean eigenvalue of C_xx,
using ONE eigendecomposition C_xx = QΛQᵀ: with R = QᵀC_xy,
    RSS(λ) = tr C_yy − Σᵢ ‖Rᵢ‖² (Λᵢ + 2λ)/(Λᵢ + λ)²,   df(λ) = Σᵢ Λᵢ/(Λᵢ + λ),   GCV = n·RSS / (n − 1 − df)².
λ = "cv" picks the k-fold cross-validation minimiser over the same relative grid (`cv_lambda`): one
eigendecomposition per training fold, and the held-out squared error of every λ from the held-out fold's statistics
alone (no pass over rows per λ). λ is compared relative to the mean eigenvalue, so folds of n(k−1)/k rows and the
final fit on all n rows use the same per-row shrinkage.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax.align.maps import AffineMap
from linalign_jax.distributed import data_mesh, data_size, pad_rows, replicated, row_sharding
from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import Progress

log = logging.getLogger(__name__)

# GCV grid: λ / mean-eigenvalue from 1e-8 to 1e2 (41 points, 4 per decade).
GCV_GRID = tuple(10.0 ** np.linspace(-8, 2, 41))


@dataclasses.dataclass(frozen=True)
class RidgeStats:
    """Sums over n rows of (x − shift_x) and (y − shift_y), float64 host arrays.

    A pytree of host arrays, so processes can exchange it as is; `merge_stats` combines any two, whatever their shifts
    (`linalign_jax.align.distributed` reduces them across processes that way).
    """

    n: float
    shift_x: np.ndarray  # [dx]
    shift_y: np.ndarray  # [dy]
    sum_x: np.ndarray    # [dx]
    sum_y: np.ndarray    # [dy]
    xtx: np.ndarray      # [dx, dx]
    xty: np.ndarray      # [dx, dy]
    yty_diag: np.ndarray  # [dy]  Σ (y − shift_y)² per target dimension


    @property
    def dims(self) -> tuple[int, int]:
        return self.xty.shape

    def mean_x(self) -> np.ndarray:
        return self.shift_x + self.sum_x / self.n

    def mean_y(self) -> np.ndarray:
        return self.shift_y + self.sum_y / self.n

    def centered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(C_xx, C_xy, diag C_yy): centred sums of squares and cross-products."""
        mx, my = self.sum_x / self.n, self.sum_y / self.n
        cxx = self.xtx - self.n * np.outer(mx, mx)
        cxx = 0.5 * (cxx + cxx.T)
        return cxx, self.xty - self.n * np.outer(mx, my), self.yty_diag - self.n * my * my

    def rebase(self, shift_x: np.ndarray, shift_y: np.ndarray) -> "RidgeStats":
        """The same statistics expressed around new shifts (exact algebra in float64)."""
        if np.array_equal(shift_x, self.shift_x) and np.array_equal(shift_y, self.shift_y):
            return self
        dx, dy = self.shift_x - shift_x, self.shift_y - shift_y
        n, sx, sy = self.n, self.sum_x, self.sum_y
        return RidgeStats(
            n=n, shift_x=np.asarray(shift_x, np.float64), shift_y=np.asarray(shift_y, np.float64),
            sum_x=sx + n * dx, sum_y=sy + n * dy,
            xtx=self.xtx + np.outer(sx, dx) + np.outer(dx, sx) + n * np.outer(dx, dx),
            xty=self.xty + np.outer(sx, dy) + np.outer(dx, sy) + n * np.outer(dx, dy),
            yty_diag=self.yty_diag + 2 * sy * dy + n * dy * dy)


jax.tree_util.register_dataclass(
    RidgeStats, data_fields=["n", "shift_x", "shift_y", "sum_x", "sum_y", "xtx", "xty", "yty_diag"], meta_fields=[])


def merge_stats(a: RidgeStats, b: RidgeStats) -> RidgeStats:
    """a + b, re-basing b onto a's shifts. Associative, so any reduction tree (devices, processes) gives one answer."""
    if a.dims != b.dims:
        raise LinalignError(f"cannot merge ridge statistics of dims {a.dims} and {b.dims}")
    b = b.rebase(a.shift_x, a.shift_y)
    return RidgeStats(n=a.n + b.n, shift_x=a.shift_x, shift_y=a.shift_y, sum_x=a.sum_x + b.sum_x,
                      sum_y=a.sum_y + b.sum_y, xtx=a.xtx + b.xtx, xty=a.xty + b.xty,
                      yty_diag=a.yty_diag + b.yty_diag)


@jax.jit
def _shifted_sums(x, y, mask, shift_x, shift_y):
    """Float32 shifted sums of one row-sharded batch; XLA all-reduces the row contractions over the data axis."""
    xs = (x - shift_x) * mask[:, None]
    ys = (y - shift_y) * mask[:, None]
    # HIGHEST: true float32 products (GPUs would otherwise use TF32, ~1e-4 relative error in the Gram).
    gram = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    return xs.sum(0), ys.sum(0), gram(xs.T, xs), gram(xs.T, ys), (ys * ys).sum(0)


def batch_stats(x: np.ndarray, y: np.ndarray, *, shift_x: np.ndarray | None = None, shift_y: np.ndarray | None = None,
                precision: str = "float64", mesh=None) -> RidgeStats:
    """Statistics of one batch of paired rows. Pure: the same inputs give the same `RidgeStats` on any process.

    precision="float64": host numpy float64 throughout (exact reference). precision="float32": the Gram products run in
    XLA float32 with rows sharded over the mesh's data axis; only the (small) results are promoted to float64.
    Shifts default to this batch's means.
    """
    return _finish(_start(x, y, shift_x, shift_y, precision, mesh))


def _start(x, y, shift_x, shift_y, precision, mesh):
    """Begin one batch: float32 work is dispatched to the devices and returns at once (JAX is asynchronous)."""
    x, y = _check_pair(x, y)
    shift_x = x.mean(0, dtype=np.float64) if shift_x is None else np.asarray(shift_x, np.float64)
    shift_y = y.mean(0, dtype=np.float64) if shift_y is None else np.asarray(shift_y, np.float64)
    if precision == "float64":
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported by _finish, by name
            xs, ys = x.astype(np.float64) - shift_x, y.astype(np.float64) - shift_y
            parts = xs.sum(0), ys.sum(0), xs.T @ xs, xs.T @ ys, (ys * ys).sum(0)
    elif precision == "float32":
        mesh = data_mesh(mesh)
        xp, yp = np.asarray(x, np.float32), np.asarray(y, np.float32)
        mask = np.ones(len(xp), np.float32)
        if len(xp) % data_size(mesh):
            (xp, mask), (yp, _) = pad_rows(xp, data_size(mesh)), pad_rows(yp, data_size(mesh))
        rows, rep = row_sharding(mesh), replicated(mesh)
        parts = _shifted_sums(jax.device_put(xp, rows), jax.device_put(yp, rows),
                              jax.device_put(mask, row_sharding(mesh, 1)),
                              jax.device_put(shift_x.astype(np.float32), rep),
                              jax.device_put(shift_y.astype(np.float32), rep))
    else:
        raise LinalignError(f"precision must be 'float64' or 'float32', got {precision!r}")
    return x, y, shift_x, shift_y, parts


def _finish(started) -> RidgeStats:
    """Wait for a started batch, promote its sums to float64 and check them."""
    x, y, shift_x, shift_y, parts = started
    stats = RidgeStats(float(x.shape[0]), shift_x, shift_y, *(np.asarray(p, np.float64) for p in parts))
    if not (np.isfinite(stats.xtx).all() and np.isfinite(stats.yty_diag).all()):
        raise LinalignError(f"features contain NaN or Inf (source finite: {bool(np.isfinite(x).all())}, "
                            f"target finite: {bool(np.isfinite(y).all())})")
    return stats


def accumulate_stats(batches: Iterable[tuple[np.ndarray, np.ndarray]], *, precision: str = "float64", mesh=None,
                     total: int | None = None) -> RidgeStats:
    """Stream (x, y) batches into one `RidgeStats`; the first batch's means are the shift for all of them.

    Batch i+1 is dispatched before batch i is collected, so with precision="float32" host→device copies and the host's
    float64 merging overlap with device work.
    """
    stats, pending, shift = None, None, (None, None)
    progress = Progress("ridge statistics", total=total, unit="rows")
    for x, y in batches:
        started = _start(x, y, *shift, precision, mesh)
        shift = started[2], started[3]
        if pending is not None:
            stats = _merge_into(stats, _finish(pending))
            progress.update(len(pending[0]))
        pending = started
    if pending is None:
        raise LinalignError("no rows to fit a ridge map on")
    stats = _merge_into(stats, _finish(pending))
    progress.update(len(pending[0]))
    if total is not None:
        progress.close()
    return stats


def _merge_into(stats: RidgeStats | None, part: RidgeStats) -> RidgeStats:
    return part if stats is None else merge_stats(stats, part)


def iterate_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    x, y = _check_pair(x, y)
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


@dataclasses.dataclass(frozen=True)
class Eigensystem:
    """C_xx = Q diag(evals) Qᵀ and R = Qᵀ C_xy: everything ridge needs for any λ."""

    evals: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    yy_trace: float
    n: float


def eigensystem(stats: RidgeStats) -> Eigensystem:
    cxx, cxy, cyy = stats.centered()
    evals, Q = np.linalg.eigh(cxx)
    evals = np.clip(evals, 0.0, None)
    return Eigensystem(evals=evals, Q=Q, R=Q.T @ cxy, yy_trace=float(cyy.sum()), n=stats.n)


def ridge_weights(eig: Eigensystem, lam: float) -> np.ndarray:
    _check_lambda(lam)
    return eig.Q @ (eig.R / (eig.evals + lam)[:, None])


def gcv_curve(eig: Eigensystem, lambdas: Sequence[float]) -> np.ndarray:
    """GCV score per λ (lower is better), from the eigensystem alone."""
    r2 = (eig.R ** 2).sum(1)
    scores = []
    for lam in lambdas:
        _check_lambda(lam)
        shrink = eig.evals + lam
        rss = eig.yy_trace - float((r2 * (eig.evals + 2 * lam) / shrink ** 2).sum())
        dof = float((eig.evals / shrink).sum())
        scores.append(eig.n * max(rss, 0.0) / max(eig.n - 1.0 - dof, 1e-12) ** 2)
    return np.asarray(scores)


def lambda_grid(eig: Eigensystem, relative: Sequence[float] = GCV_GRID) -> np.ndarray:
    scale = max(float(eig.evals.mean()), np.finfo(np.float64).tiny)
    return scale * np.asarray(relative)


def parse_lambda(text: str, allow_cv: bool = False) -> float | str:
    """A λ given as text (the binaries' --ridge_lambda): "auto", "cv" (where the caller fits from rows, allow_cv),
    or a finite float > 0."""
    if text == "auto" or (allow_cv and text == "cv"):
        return text
    try:
        lam = float(text)
    except ValueError:
        raise LinalignError(f"ridge lambda must be a positive float or 'auto', got {text!r}") from None
    _check_lambda(lam)
    return lam


def select_lambda(eig: Eigensystem, lam: float | str) -> tuple[float, dict]:
    """Resolve "auto" by GCV over `lambda_grid`; a number is checked and returned. Returns (λ, info)."""
    if lam == "auto":
        grid = lambda_grid(eig)
        scores = gcv_curve(eig, grid)
        best = int(np.argmin(scores))
        chosen = float(grid[best])
        info = {"lambda": chosen, "lambda_selection": "gcv", "lambda_grid": grid.tolist(), "gcv": scores.tolist()}
        warning = _gcv_warning(eig, best, len(grid))
        if warning:
            log.warning("%s", warning)
            info["lambda_warning"] = warning
        return chosen, info
    if isinstance(lam, str):
        raise LinalignError(f"ridge lambda must be a positive float or 'auto', got {lam!r}")
    _check_lambda(lam)
    return float(lam), {"lambda": float(lam), "lambda_selection": "fixed"}


def _gcv_warning(eig: Eigensystem, best: int, grid_size: int) -> str | None:
    """Why a GCV λ should not be trusted, or None.

    With n − 1 < d fit rows the centred Gram has rank n − 1 < d: the ridge fit can interpolate its rows, the GCV
    denominator (n − 1 − df)² goes to 0 with its numerator, and the minimum lands at the grid's lower bound.
    """
    dims, n = eig.evals.size, int(eig.n)
    relative = GCV_GRID[best]
    problems = []
    if n - 1 < dims:
        problems.append(f"{n} fit rows for {dims} source dims (GCV needs more rows than dims)")
    if best in (0, grid_size - 1):
        problems.append(f"GCV has no minimum inside its grid: λ was clamped at the grid's "
                        f"{'lower' if best == 0 else 'upper'} bound")
    if not problems:
        return None
    return (f"ridge λ by GCV = {GCV_GRID[best] * max(float(eig.evals.mean()), np.finfo(np.float64).tiny):.3g} "
            f"({relative:.0e} × the mean eigenvalue) is unreliable: {'; '.join(problems)}. Fit on more rows or give "
            "a fixed --ridge_lambda")


def fold_statistics(x: np.ndarray, y: np.ndarray, folds: int, batch_size: int = 8192, seed: int = 0
                    ) -> list[RidgeStats]:
    """Ridge statistics of `folds` disjoint random row sets of (x, y) (a fixed seeded permutation)."""
    x, y = _check_pair(x, y)
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= x.shape[0] // 2:
        raise LinalignError(f"k-fold CV needs 2 <= folds <= N/2 = {x.shape[0] // 2}, got {folds!r}")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    return [accumulate_stats(iterate_batches(x[part], y[part], batch_size)) for part in np.array_split(order, folds)]


def cv_curve(folds: Sequence[RidgeStats], relative: Sequence[float] = GCV_GRID) -> np.ndarray:
    """Total held-out squared error per relative λ (λ = relative × mean eigenvalue of each training fold's C_xx).

    For held-out rows x', y' (taken about the held-out fold's shifts) and a map fitted on the other folds,
    e = y' − x'W − c with c = (ȳ_tr − shift_y) − (x̄_tr − shift_x)W, so
        Σ‖e‖² = Σ‖y'‖² − 2 tr(WᵀX'ᵀY') + tr(WᵀX'ᵀX'W) − 2 c·(Σy' − Σx'W) + n'‖c‖².
    With W = Q diag(g) R, g = 1/(Λ + λ), both traces are O(d²) per λ: tr(WᵀX'ᵀY') = g·p, p_i = Σ_k R_ik (QᵀX'ᵀY')_ik,
    and tr(WᵀX'ᵀX'W) = gᵀ ((QᵀX'ᵀX'Q) ∘ RRᵀ) g.
    """
    if len(folds) < 2:
        raise LinalignError(f"k-fold CV needs at least 2 folds, got {len(folds)}")
    total = np.zeros(len(relative))
    for f, held in enumerate(folds):
        train = functools.reduce(merge_stats, [s for g, s in enumerate(folds) if g != f])
        eig = eigensystem(train)
        scale = max(float(eig.evals.mean()), np.finfo(np.float64).tiny)
        p = (eig.R * (eig.Q.T @ held.xty)).sum(1)
        h = (eig.Q.T @ held.xtx @ eig.Q) * (eig.R @ eig.R.T)
        u = (train.mean_x() - held.shift_x) @ eig.Q          # rows in the eigenbasis
        v = train.mean_y() - held.shift_y
        sx_q = held.sum_x @ eig.Q
        yy = float(held.yty_diag.sum())
        for i, rel in enumerate(relative):
            g = 1.0 / (eig.evals + rel * scale)
            c = v - (u * g) @ eig.R
            resid_sum = held.sum_y - (sx_q * g) @ eig.R
            total[i] += yy - 2 * g @ p + g @ h @ g - 2 * c @ resid_sum + held.n * c @ c
    return total


def cv_lambda(folds: Sequence[RidgeStats], full: RidgeStats, relative: Sequence[float] = GCV_GRID
              ) -> tuple[float, dict]:
    """λ for the fit on `full` (all rows) by k-fold CV over `folds` (a partition of the same rows)."""
    scores = cv_curve(folds, relative)
    best = int(np.argmin(scores))
    scale = max(float(eigensystem(full).evals.mean()), np.finfo(np.float64).tiny)
    chosen = float(relative[best] * scale)
    return chosen, {"lambda": chosen, "lambda_selection": f"cv{len(folds)}", "lambda_relative": float(relative[best]),
                    "lambda_grid": (np.asarray(relative) * scale).tolist(), "cv_sse": scores.tolist()}


def solve_ridge(stats: RidgeStats, lam: float | str = "auto") -> tuple[AffineMap, dict]:
    """(map, info); info holds "method", "lambda" and, for λ="auto", the GCV grid and scores."""
    eig = eigensystem(stats)
    lam, info = select_lambda(eig, lam)
    return _affine(stats, ridge_weights(eig, lam)), {"method": "ridge", **info}


def solve_reduced_rank(stats: RidgeStats, rank: int, lam: float | str = "auto") -> tuple[AffineMap, dict]:
    """Reduced-rank ridge: the ridge fit projected onto the top-`rank` principal directions of its fitted values,
    W_r = W V_r V_rᵀ with V_r the leading eigenvectors of Wᵀ C_xx W (Izenman 1975, with a ridge penalty)."""
    dx, dy = stats.dims
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(dx, dy):
        raise LinalignError(f"reduced-rank map needs 1 <= rank <= min(source dim {dx}, target dim {dy}), got {rank!r}")
    eig = eigensystem(stats)
    lam, info = select_lambda(eig, lam)
    W = ridge_weights(eig, lam)
    QtW = eig.Q.T @ W
    fitted_cov = QtW.T @ (QtW * eig.evals[:, None])
    _, vecs = np.linalg.eigh(fitted_cov)
    top = vecs[:, -rank:]
    return _affine(stats, W @ top @ top.T), {"method": "rrr", "rank": int(rank), **info}


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float | str = "auto", *, batch_size: int = 8192,
              precision: str = "float64", mesh=None) -> tuple[AffineMap, dict]:
    """Ridge map from in-memory arrays, streamed in batches (the same path as out-of-core data)."""
    stats = accumulate_stats(iterate_batches(x, y, batch_size), precision=precision, mesh=mesh)
    return solve_ridge(stats, lam)


def _affine(stats: RidgeStats, W: np.ndarray) -> AffineMap:
    b = stats.mean_y() - stats.mean_x() @ W
    return AffineMap(W=W.astype(np.float32), b=b.astype(np.float32))


def _check_lambda(lam: float) -> None:
    if not np.isfinite(lam) or lam <= 0:
        raise LinalignError(f"ridge lambda must be a finite float > 0, got {lam!r}")


def _check_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2:
        raise LinalignError(f"features must be 2-D [N, d]; got source {x.shape}, target {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise LinalignError(f"source and target features must pair row by row: N={x.shape[0]} vs N={y.shape[0]}")
    if x.shape[0] == 0:
        raise LinalignError("no rows to fit a map on (N=0)")
    return x, y
