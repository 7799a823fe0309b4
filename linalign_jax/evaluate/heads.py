"""The target model's linear head f(z) = zV + c (paper §2.1): multinomial logistic regression trained with optax.

Full-batch Adam on the cross-entropy plus an L2 penalty on V, with early stopping on a held-out split (the best
parameters by held-out loss are kept). Features are standardised for conditioning and the standardisation is folded
back into V and c, so the head acts on raw embeddings — which is what a mapped source embedding is.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linalign_jax.align.optax_map import holdout_split
from linalign_jax.errors import LinalignError


@dataclasses.dataclass(frozen=True)
class LinearHead:
    V: np.ndarray  # [d, K]
    c: np.ndarray  # [K]

    def logits(self, z) -> np.ndarray:
        z = np.asarray(z, np.float32)
        if z.ndim != 2 or z.shape[1] != self.V.shape[0]:
            raise LinalignError(f"head expects features [N, {self.V.shape[0]}], got {z.shape}")
        return z @ self.V + self.c

    def predict(self, z) -> np.ndarray:
        return self.logits(z).argmax(1)


jax.tree_util.register_dataclass(LinearHead, data_fields=["V", "c"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    l2: float = 1e-3            # on the standardised-feature weights, times mean over rows of the loss
    learning_rate: float = 0.05
    max_steps: int = 3000
    eval_every: int = 25        # steps per jitted chunk; early stopping is checked between chunks
    patience: int = 6           # chunks without held-out improvement before stopping
    val_fraction: float = 0.15


def _loss(head: LinearHead, x, y, l2):
    logits = x @ head.V + head.c
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + l2 * jnp.sum(head.V ** 2)


@functools.partial(jax.jit, static_argnames=("learning_rate", "steps"))
def _chunk(head, opt_state, x, y, l2, learning_rate: float, steps: int):
    tx = optax.adam(learning_rate)

    def step(carry, _):
        head, opt_state = carry
        grads = jax.grad(_loss)(head, x, y, l2)
        updates, opt_state = tx.update(grads, opt_state, head)
        return (optax.apply_updates(head, updates), opt_state), None

    (head, opt_state), _ = jax.lax.scan(step, (head, opt_state), None, length=steps)
    return head, opt_state


_val_loss = jax.jit(lambda head, x, y: optax.softmax_cross_entropy_with_integer_labels(x @ head.V + head.c, y).mean())


def train_head(x: np.ndarray, labels: np.ndarray, num_classes: int, key: jax.Array,
               config: HeadConfig = HeadConfig()) -> LinearHead:
    x = np.asarray(x, np.float32)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise LinalignError(f"head training needs features [N, d] and labels [N]: got {x.shape}, {labels.shape}")
    if not np.isfinite(x).all():
        raise LinalignError("head training features contain NaN or Inf")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise LinalignError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    split_key, init_key = jax.random.split(key)
    tr, va = holdout_split(split_key, x.shape[0], config.val_fraction, "head training (labelled rows)")
    mu = x[tr].mean(0)
    sigma = np.maximum(x[tr].std(0), 1e-6)
    xs = (x - mu) / sigma
    x_tr, y_tr, x_va, y_va = jnp.asarray(xs[tr]), jnp.asarray(labels[tr]), jnp.asarray(xs[va]), jnp.asarray(labels[va])

    d = x.shape[1]
    head = LinearHead(V=0.01 * jax.random.normal(init_key, (d, num_classes), jnp.float32),
                      c=jnp.zeros(num_classes, jnp.float32))
    opt_state = optax.adam(config.learning_rate).init(head)
    best_loss, best_head, since = np.inf, head, 0
    for _ in range(max(1, config.max_steps // config.eval_every)):
        head, opt_state = _chunk(head, opt_state, x_tr, y_tr, config.l2, config.learning_rate,
                                 config.eval_every)
        loss = float(_val_loss(head, x_va, y_va))
        if loss < best_loss - 1e-6:
            best_loss, best_head, since = loss, head, 0
        else:
            since += 1
            if since >= config.patience:
                break
    V = np.asarray(best_head.V, np.float64) / sigma[:, None]
    c = np.asarray(best_head.c, np.float64) - mu @ V
    return LinearHead(V=V.astype(np.float32), c=c.astype(np.float32))


def accuracy(head: LinearHead, z: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(head.predict(z) == np.asarray(labels)))
