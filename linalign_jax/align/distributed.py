"""Fitting maps when the paired features are split across processes (each holds its `process_slice` of the rows).

Ridge: every process streams its own rows into a `RidgeStats` (float32 Gram products on its local devices, float64
totals), then the per-process statistics are gathered bit-exactly and merged in process order, so every process
solves the same system and gets the same map as one process holding all rows.

Optax: the (small) feature matrices are gathered to every host, and training runs data-parallel on the global mesh:
each minibatch's rows are sharded over every device of every process and XLA all-reduces the gradients. Same key,
same rows in the same order, so the same minibatches as a single-process run.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from linalign_jax.align import optax_map, ridge
from linalign_jax.align.maps import AffineMap
from linalign_jax.distributed import global_mesh, local_mesh, process_allgather_rows, process_stack
from linalign_jax.errors import LinalignError


def reduce_ridge_stats(local: ridge.RidgeStats) -> ridge.RidgeStats:
    """Merge every process's statistics (process order); identical on all processes."""
    if jax.process_count() == 1:
        return local
    stacked = process_stack(local)
    parts = [jax.tree_util.tree_map(lambda leaf, p=p: leaf[p], stacked) for p in range(jax.process_count())]
    nonempty = [s for s in parts if s.n > 0]
    if not nonempty:
        raise LinalignError("no rows to fit a ridge map on (every process holds 0 rows)")
    return functools.reduce(ridge.merge_stats, nonempty)


def local_ridge_stats(x_local: np.ndarray, y_local: np.ndarray, *, batch_size: int = 8192,
                      precision: str = "float32") -> ridge.RidgeStats:
    """This process's statistics over its own rows, on its own devices; an empty slice gives n = 0."""
    if len(x_local) == 0:
        dx, dy = np.shape(x_local)[1], np.shape(y_local)[1]
        zeros = functools.partial(np.zeros, dtype=np.float64)
        return ridge.RidgeStats(0.0, zeros(dx), zeros(dy), zeros(dx), zeros(dy), zeros((dx, dx)), zeros((dx, dy)),
                                zeros(dy))
    return ridge.accumulate_stats(ridge.iterate_batches(x_local, y_local, batch_size), precision=precision,
                                  mesh=local_mesh(), total=len(x_local))


def fit_ridge(x_local: np.ndarray, y_local: np.ndarray, lam: float | str = "auto", *, batch_size: int = 8192,
              precision: str = "float32") -> tuple[AffineMap, dict]:
    """Ridge map over the rows of all processes; returns (map, info) on every process."""
    stats = reduce_ridge_stats(local_ridge_stats(x_local, y_local, batch_size=batch_size, precision=precision))
    affine, info = ridge.solve_ridge(stats, lam)
    return affine, {**info, "n_rows": stats.n, "processes": jax.process_count()}


def fit_optax_map(x_local: np.ndarray, y_local: np.ndarray, key: jax.Array,
                  config: optax_map.OptaxMapConfig = optax_map.OptaxMapConfig()) -> tuple[AffineMap, dict]:
    """optax map over the rows of all processes, data-parallel on `global_mesh()`; (map, info) on every process."""
    x, y = process_allgather_rows(np.asarray(x_local)), process_allgather_rows(np.asarray(y_local))
    mesh = global_mesh()
    affine, info = optax_map.fit_optax_map(x, y, key, config, mesh=mesh)
    return affine, {**info, "processes": jax.process_count(), "devices": int(mesh.size)}
