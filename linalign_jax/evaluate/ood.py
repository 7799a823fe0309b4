"""OOD scores from a linear head's logits and the detection metrics (paper §2.5).

Scores are oriented so that higher = more in-distribution: the negative Energy, logsumexp(f(z)) (the paper's
detector, Liu et al. 2020), and the maximum softmax probability (MSP, Hendrycks & Gimpel 2017). In-distribution rows
are the positives of AUROC; FPR@95TPR is the fraction of OOD rows accepted at the threshold that keeps 95% of ID rows.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax
from scipy.stats import rankdata

from linalign_jax.errors import LinalignError


def energy_score(logits: np.ndarray) -> np.ndarray:
    """−E(z) = logsumexp_k f(z)_k (higher = more in-distribution)."""
    return logsumexp(np.asarray(logits, np.float64), axis=1)


def msp_score(logits: np.ndarray) -> np.ndarray:
    return softmax(np.asarray(logits, np.float64), axis=1).max(1)


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """P(score_ID > score_OOD) + ½ P(tie): the Mann–Whitney U statistic, exact with ties."""
    id_scores, ood_scores = _check(id_scores, ood_scores)
    ranks = rankdata(np.concatenate([id_scores, ood_scores]))
    n_id, n_ood = len(id_scores), len(ood_scores)
    return float((ranks[:n_id].sum() - n_id * (n_id + 1) / 2) / (n_id * n_ood))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    id_scores, ood_scores = _check(id_scores, ood_scores)
    # The largest threshold that still accepts at least `tpr` of the ID rows.
    threshold = np.sort(id_scores)[int(np.floor((1.0 - tpr) * len(id_scores) + 1e-9))]
    return float(np.mean(ood_scores >= threshold))


def ood_metrics(id_logits: np.ndarray, ood_logits: np.ndarray) -> dict[str, float]:
    """{"energy_auroc", "msp_auroc", "energy_fpr95", "msp_fpr95"}."""
    out = {}
    for name, score in (("energy", energy_score), ("msp", msp_score)):
        s_id, s_ood = score(id_logits), score(ood_logits)
        out[f"{name}_auroc"] = auroc(s_id, s_ood)
        out[f"{name}_fpr95"] = fpr_at_tpr(s_id, s_ood)
    return out


def _check(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    id_scores, ood_scores = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
    if id_scores.ndim != 1 or ood_scores.ndim != 1 or not len(id_scores) or not len(ood_scores):
        raise LinalignError(f"OOD metrics need non-empty 1-D ID and OOD scores, got {id_scores.shape}, "
                            f"{ood_scores.shape}")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise LinalignError("OOD scores contain NaN or Inf")
    return id_scores, ood_scores
