import numpy as np
import pytest
from scipy.special import logsumexp

from linalign_jax.errors import LinalignError
from linalign_jax.evaluate import ood


def _pairwise_auroc(a, b):
    return np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])


def test_auroc_equals_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 40).astype(float)
    b = rng.integers(0, 4, 30).astype(float)
    assert ood.auroc(a, b) == pytest.approx(_pairwise_auroc(a, b))
    assert ood.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert ood.auroc([0.0, 1.0], [2.0, 3.0]) == 0.0


def test_fpr_at_95_tpr():
    id_scores = np.arange(100, dtype=float)      # threshold keeps the top 95 ID scores: >= 5
    ood_scores = np.array([0.0, 4.0, 5.0, 50.0])  # two of four OOD scores pass it
    assert ood.fpr_at_tpr(id_scores, ood_scores) == 0.5


def test_scores_and_metrics():
    logits = np.array([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(ood.energy_score(logits), logsumexp(logits, axis=1))
    np.testing.assert_allclose(ood.msp_score(logits), [np.exp(10) / (np.exp(10) + 2), 1 / 3])
    rng = np.random.default_rng(1)
    confident = rng.normal(size=(50, 3)) + np.array([6.0, 0, 0])
    flat = rng.normal(size=(50, 3)) * 0.1
    m = ood.ood_metrics(confident, flat)
    assert m["energy_auroc"] > 0.95 and m["msp_auroc"] > 0.95 and m["energy_fpr95"] < 0.1
    assert set(m) == {"energy_auroc", "msp_auroc", "energy_fpr95", "msp_fpr95"}


def test_bad_scores():
    with pytest.raises(LinalignError, match="non-empty"):
        ood.auroc([], [1.0])
    with pytest.raises(LinalignError, match="NaN"):
        ood.auroc([np.nan], [1.0])


def test_feature_detectors_against_direct_definitions():
    from linalign_jax.evaluate.ood import feature_ood_metrics, fit_feature_detectors

    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(3), 40)
    means = rng.normal(size=(3, 5)) * 3
    train = means[labels] + rng.normal(size=(120, 5)) @ np.diag([1, 2, 0.5, 1, 1])
    queries = np.concatenate([means[rng.integers(0, 3, 30)] + rng.normal(size=(30, 5)),
                              rng.normal(size=(30, 5)) * 6 + 10])
    det = fit_feature_detectors(train, labels, 3, k=4)
    scores = det.scores(queries)
    # kNN (Sun et al. 2022): minus the distance of the normalised query to its 4th-nearest normalised training row
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    dist = np.sqrt(((qn[:, None] - tn[None]) ** 2).sum(-1))
    kth = np.sort(dist, axis=1)[:, 3]
    np.testing.assert_allclose(scores["knn"], 1 - kth ** 2 / 2, atol=1e-12)  # cos = 1 − ‖a − b‖²/2 on the sphere
    # Mahalanobis (Lee et al. 2018): tied covariance of the class-centred rows
    centred = train - np.stack([train[labels == c].mean(0) for c in range(3)])[labels]
    prec = np.linalg.inv(centred.T @ centred / len(train))
    maha = np.stack([np.einsum("nd,de,ne->n", queries - train[labels == c].mean(0), prec,
                               queries - train[labels == c].mean(0)) for c in range(3)], 1).min(1)
    np.testing.assert_allclose(scores["mahalanobis"], -maha, rtol=1e-9)
    m = feature_ood_metrics(det, queries[:30], queries[30:])
    assert set(m) == {"knn_auroc", "knn_fpr95", "mahalanobis_auroc", "mahalanobis_fpr95"}
    assert m["mahalanobis_auroc"] > 0.95 and m["knn_auroc"] > 0.5
    with pytest.raises(LinalignError, match="k must be"):
        fit_feature_detectors(train, labels, 3, k=0)
