import numpy as np
import pytest

from linalign_jax.align import metrics
from linalign_jax.errors import LinalignError


def test_perfect_and_mean_predictions():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 8))
    assert metrics.map_metrics(y, y) == pytest.approx({"r2": 1.0, "cosine": 1.0, "top1": 1.0, "top5": 1.0})
    assert metrics.r2_score(np.broadcast_to(y.mean(0), y.shape), y) == pytest.approx(0.0, abs=1e-12)


def test_retrieval_counts_rank_of_true_target_blockwise(monkeypatch):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(30, 6))
    pred = y[np.r_[1, 0, 2:30]]  # rows 0 and 1 swapped: both miss top-1, both are within top-5 (rank 2 at worst)
    monkeypatch.setattr(metrics, "RETRIEVAL_BLOCK", 7)
    got = metrics.retrieval_topk(pred, y, ks=(1, 5))
    sims = (pred / np.linalg.norm(pred, axis=1, keepdims=True)) @ (y / np.linalg.norm(y, axis=1, keepdims=True)).T
    ranks = (sims > sims[np.arange(30), np.arange(30)][:, None]).sum(1)
    assert got == {"top1": float(np.mean(ranks < 1)), "top5": float(np.mean(ranks < 5))}
    assert got["top1"] == pytest.approx(28 / 30)


def test_cosine_is_scale_invariant_and_shape_checked():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(10, 4))
    assert metrics.mean_cosine(3.0 * y, y) == pytest.approx(1.0)
    assert metrics.mean_cosine(-y, y) == pytest.approx(-1.0)
    with pytest.raises(LinalignError, match="one shape"):
        metrics.map_metrics(y[:, :3], y)


def test_map_diagnostics_against_direct_formulas():
    from linalign_jax.align.metrics import effective_rank, map_diagnostics

    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    W = u[:, :1] @ rng.normal(size=(1, 4))
    assert effective_rank(np.linalg.svd(W, compute_uv=False)) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(np.ones(5)) == pytest.approx(5.0)
    target = rng.normal(size=(50, 3))
    pred = target + rng.normal(size=(50, 3)) * np.array([0.1, 1.0, 3.0])
    d = map_diagnostics(rng.normal(size=(5, 3)), pred, target)
    for j in range(3):
        ss_res = np.sum((pred[:, j] - target[:, j]) ** 2)
        ss_tot = np.sum((target[:, j] - target[:, j].mean()) ** 2)
        assert d["r2_per_dim"][j] == pytest.approx(1 - ss_res / ss_tot)
    assert d["singular_values"] == sorted(d["singular_values"], reverse=True) and len(d["singular_values"]) == 3
