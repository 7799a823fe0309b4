"""Affine map trained by gradient descent (optax) — for losses with no closed form (cosine) and for data that only
streams through an accelerator. One jitted call runs a whole epoch (`lax.scan` over minibatches); minibatch rows are
sharded over the mesh's data axis, so gradients are data-parallel (XLA inserts the all-reduce). Training stops when
the held-out loss has not improved for `patience` epochs, and the best parameters seen are returned.
Inputs are standardised per feature for conditioning (embeddings often share a large offset); the standardisation is
folded back into W and b, so the returned map acts on raw features.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linalign_jax.align.maps import AffineMap
from linalign_jax.align.mesh import data_mesh, data_size, replicated, row_sharding
from linalign_jax.align.ridge import _check_pair
from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import Progress

LOSSES = ("mse", "cosine")
OPTIMIZERS = ("adam", "adamw")


@dataclasses.dataclass(frozen=True)
class OptaxMapConfig:
    loss: str = "mse"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4   # AdamW only
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10
    val_fraction: float = 0.1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise LinalignError(f"optax map loss must be one of {LOSSES}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise LinalignError(f"optax map optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise LinalignError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise LinalignError(f"batch_size, max_epochs and patience must be >= 1: {self}")


def map_loss(params: AffineMap, x, y, loss: str):
    pred = x @ params.W + params.b
    if loss == "mse":
        return jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))
    cos = jnp.sum(pred * y, -1) / (jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(y, axis=-1) + 1e-8)
    return jnp.mean(1.0 - cos)


def fit_optax_map(x: np.ndarray, y: np.ndarray, key: jax.Array, config: OptaxMapConfig = OptaxMapConfig(),
                  mesh=None) -> tuple[AffineMap, dict]:
    """Train W, b on a (1 − val_fraction) split of the rows, early-stopped on the rest. Returns (map, info)."""
    x, y = _check_pair(x, y)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise LinalignError("features contain NaN or Inf")
    mesh = data_mesh(mesh)
    n = x.shape[0]
    n_val = max(1, int(round(n * config.val_fraction)))
    if n - n_val < 2:
        raise LinalignError(f"optax map needs at least 3 rows (got N={n})")
    key, split_key, init_key = jax.random.split(key, 3)
    order = np.asarray(jax.random.permutation(split_key, n))
    train_idx, val_idx = order[n_val:], order[:n_val]
    shards = data_size(mesh)
    batch = max(shards, min(config.batch_size, len(train_idx)) // shards * shards)
    steps = len(train_idx) // batch
    rows, rep = row_sharding(mesh), replicated(mesh)
    mu = x[train_idx].mean(0, dtype=np.float64)
    sigma = np.maximum(x[train_idx].std(0, dtype=np.float64), 1e-8)
    xs = ((x - mu) / sigma).astype(np.float32)
    x_tr, y_tr = (jax.device_put(np.asarray(a[train_idx], np.float32), rep) for a in (xs, y))
    x_va, y_va = (jax.device_put(np.asarray(a[val_idx], np.float32), rep) for a in (xs, y))

    if config.optimizer == "adam":
        tx = optax.adam(config.learning_rate)
    else:
        tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    dx, dy = x.shape[1], y.shape[1]
    params = AffineMap(W=jax.random.normal(init_key, (dx, dy), jnp.float32) / np.sqrt(dx),
                       b=jnp.asarray(y[train_idx].mean(0), jnp.float32))
    params = jax.device_put(params, rep)
    opt_state = tx.init(params)

    # The data are arguments, never closed over: captured arrays become constants baked into the compiled program
    # (gigabytes at 1M x 4096, and hashing them alone outlasts training).
    @jax.jit
    def epoch(params, opt_state, key, x_tr, y_tr, x_va, y_va):
        def step(carry, idx):
            params, opt_state = carry
            xb = jax.lax.with_sharding_constraint(x_tr[idx], rows)
            yb = jax.lax.with_sharding_constraint(y_tr[idx], rows)
            loss, grads = jax.value_and_grad(map_loss)(params, xb, yb, config.loss)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        perm = jax.random.permutation(key, x_tr.shape[0])[: steps * batch].reshape(steps, batch)
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), perm)
        return params, opt_state, losses.mean(), map_loss(params, x_va, y_va, config.loss)

    best = (np.inf, params, 0)
    progress = Progress("optax map", total=config.max_epochs, unit="epochs")
    history = []
    for ep in range(config.max_epochs):
        key, sub = jax.random.split(key)
        params, opt_state, train_loss, val_loss = epoch(params, opt_state, sub, x_tr, y_tr, x_va, y_va)
        val_loss = float(val_loss)
        history.append((float(train_loss), val_loss))
        progress.update()
        if val_loss < best[0]:
            best = (val_loss, params, ep)
        elif ep - best[2] >= config.patience:
            break
    progress.close()
    W_std, b_std = (np.asarray(a, np.float64) for a in (best[1].W, best[1].b))
    W = (W_std / sigma[:, None]).astype(np.float32)
    b = (b_std - (mu / sigma) @ W_std).astype(np.float32)
    info = {"method": "optax", **dataclasses.asdict(config), "epochs_run": len(history), "best_epoch": best[2],
            "best_val_loss": best[0], "history": history}
    return AffineMap(W=W, b=b), info
