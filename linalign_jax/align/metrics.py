"""How well a map predicts held-out target features: R², mean cosine, and retrieval of the true target among all
held-out targets (top-1 / top-5 by cosine). Retrieval is computed in row blocks, so N×N scores never exist at once.
`map_diagnostics` describes the map itself: the singular spectrum of W, its effective rank and the R² of each target
dimension."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax.errors import LinalignError

RETRIEVAL_BLOCK = 1024


def r2_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Variance-weighted R² = 1 − Σ‖ŷ − y‖² / Σ‖y − ȳ‖² over all target dims."""
    pred, target = _pair(pred, target)
    sse = ((pred - target) ** 2).sum()
    sst = ((target - target.mean(0)) ** 2).sum()
    return float(1.0 - sse / max(sst, np.finfo(np.float64).tiny))


def mean_cosine(pred: np.ndarray, target: np.ndarray) -> float:
    pred, target = _pair(pred, target)
    return float(np.mean((_normalize(pred) * _normalize(target)).sum(1)))


@functools.partial(jax.jit, static_argnames="ks")
def _ranks_block(queries, keys, true_idx, ks):
    scores = queries @ keys.T
    true_score = jnp.take_along_axis(scores, true_idx[:, None], axis=1)
    rank = (scores > true_score).sum(1)  # 0 = the true target scores highest
    return tuple((rank < k).sum() for k in ks)


def retrieval_topk(pred: np.ndarray, target: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose true target is among the k most cosine-similar targets to the mapped row."""
    pred, target = _pair(pred, target)
    q = jnp.asarray(_normalize(pred), jnp.float32)
    keys = jnp.asarray(_normalize(target), jnp.float32)
    hits = np.zeros(len(ks))
    n = q.shape[0]
    for start in range(0, n, RETRIEVAL_BLOCK):
        stop = min(start + RETRIEVAL_BLOCK, n)
        hits += np.asarray(_ranks_block(q[start:stop], keys, jnp.arange(start, stop), tuple(ks)))
    return {f"top{k}": float(h / n) for k, h in zip(ks, hits)}


def map_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """{"r2", "cosine", "top1", "top5"} on held-out pairs."""
    return {"r2": r2_score(pred, target), "cosine": mean_cosine(pred, target), **retrieval_topk(pred, target)}


def r2_per_dimension(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """R² of each target dimension, 1 − Σ(ŷ_j − y_j)² / Σ(y_j − ȳ_j)² (a constant dimension gets NaN → reported 0)."""
    pred, target = _pair(pred, target)
    sst = ((target - target.mean(0)) ** 2).sum(0)
    sse = ((pred - target) ** 2).sum(0)
    return np.where(sst > 0, 1.0 - sse / np.maximum(sst, np.finfo(np.float64).tiny), 0.0)


def effective_rank(singular_values: np.ndarray) -> float:
    """exp(entropy of σ / Σσ) (Roy & Vetterli 2007): 1 for a rank-one map, min(d_s, d_t) for a flat spectrum."""
    s = np.asarray(singular_values, np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def map_diagnostics(W: np.ndarray, pred: np.ndarray, target: np.ndarray) -> dict:
    """{"singular_values": σ(W) descending, "effective_rank", "stable_rank" (‖W‖_F² / σ_max²), "r2_per_dim"} on
    held-out pairs (pred = mapped source rows, target = the true target rows)."""
    s = np.linalg.svd(np.asarray(W, np.float64), compute_uv=False)
    return {"singular_values": s.tolist(), "effective_rank": effective_rank(s),
            "stable_rank": float((s ** 2).sum() / max(s[0] ** 2, np.finfo(np.float64).tiny)) if s.size else 0.0,
            "r2_per_dim": r2_per_dimension(pred, target).tolist()}


def _normalize(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.shape != target.shape or pred.ndim != 2:
        raise LinalignError(f"predicted and target features must both be [N, d] of one shape: {pred.shape} vs "
                            f"{target.shape}")
    return pred, target
