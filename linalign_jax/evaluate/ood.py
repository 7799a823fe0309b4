"""OOD scores and the detection metrics (paper §2.5).

Scores are oriented so that higher = more in-distribution. From a linear head's logits: the negative Energy,
logsumexp(f(z)) (the paper's detector, Liu et al. 2020), and the maximum softmax probability (MSP, Hendrycks & Gimpel
2017). From the features themselves, given reference (training) features of the same space:
    knn          cosine similarity to the k-th nearest reference row (Sun et al. 2022: rows L2-normalised, the
                 negative k-th nearest-neighbour distance; the same order as ‖ẑ − ẑ_(k)‖)
    mahalanobis  −min_c (z − μ_c)ᵀ Σ⁺ (z − μ_c), class means μ_c and one shared (tied) covariance Σ of the reference
                 rows around their class means (Lee et al. 2018, without input pre-processing or layer ensembles)
In-distribution rows are the positives of AUROC; FPR@95TPR is the fraction of OOD rows accepted at the threshold that
keeps 95% of ID rows.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.linalg import pinvh
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


@dataclasses.dataclass(frozen=True)
class FeatureDetectors:
    """The kNN and Mahalanobis detectors fitted on reference features (what the owner of the training rows holds)."""

    reference: np.ndarray   # [N, d] L2-normalised reference rows (kNN)
    means: np.ndarray       # [C, d] class means
    precision: np.ndarray   # [d, d] pseudo-inverse of the shared covariance
    k: int

    def scores(self, z: np.ndarray) -> dict[str, np.ndarray]:
        z = np.asarray(z, np.float64)
        if z.ndim != 2 or z.shape[1] != self.means.shape[1]:
            raise LinalignError(f"detectors expect features [N, {self.means.shape[1]}], got {z.shape}")
        return {"knn": self._knn(z), "mahalanobis": self._mahalanobis(z)}

    def _knn(self, z: np.ndarray, block: int = 1024) -> np.ndarray:
        zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        out = np.empty(len(z))
        for start in range(0, len(z), block):
            sims = zn[start:start + block] @ self.reference.T
            out[start:start + block] = -np.partition(-sims, self.k - 1, axis=1)[:, self.k - 1]
        return out

    def _mahalanobis(self, z: np.ndarray) -> np.ndarray:
        zp = z @ self.precision
        mp = self.means @ self.precision
        dist = (zp * z).sum(1)[:, None] - 2 * zp @ self.means.T + (mp * self.means).sum(1)[None]  # [N, C]
        return -dist.min(1)


def fit_feature_detectors(features: np.ndarray, labels: np.ndarray, num_classes: int, k: int = 10
                          ) -> FeatureDetectors:
    """Fit both feature-space detectors on labelled reference rows (k is clamped to the number of rows)."""
    x = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels) or len(x) < 2:
        raise LinalignError(f"detectors need [N, d] reference features with N >= 2 labels, got {x.shape}, "
                            f"{labels.shape}")
    if not np.isfinite(x).all():
        raise LinalignError("reference features contain NaN or Inf")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LinalignError(f"kNN detector k must be an int >= 1, got {k!r}")
    present = [c for c in range(num_classes) if (labels == c).any()]
    means = np.stack([x[labels == c].mean(0) for c in present])
    centred = x - means[np.searchsorted(present, labels)]
    cov = centred.T @ centred / len(x)
    return FeatureDetectors(reference=x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12),
                            means=means, precision=pinvh(cov), k=min(k, len(x)))


def feature_ood_metrics(detectors: FeatureDetectors, id_features: np.ndarray, ood_features: np.ndarray
                        ) -> dict[str, float]:
    """{"knn_auroc", "mahalanobis_auroc", "knn_fpr95", "mahalanobis_fpr95"}."""
    id_scores, ood_scores = detectors.scores(id_features), detectors.scores(ood_features)
    out = {}
    for name in id_scores:
        out[f"{name}_auroc"] = auroc(id_scores[name], ood_scores[name])
        out[f"{name}_fpr95"] = fpr_at_tpr(id_scores[name], ood_scores[name])
    return out


def _check(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    id_scores, ood_scores = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
    if id_scores.ndim != 1 or ood_scores.ndim != 1 or not len(id_scores) or not len(ood_scores):
        raise LinalignError(f"OOD metrics need non-empty 1-D ID and OOD scores, got {id_scores.shape}, "
                            f"{ood_scores.shape}")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise LinalignError("OOD scores contain NaN or Inf")
    return id_scores, ood_scores
