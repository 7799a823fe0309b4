import numpy as np
import pytest

from linalign_jax.align.metrics import map_metrics
from linalign_jax.align.unsupervised import UnsupervisedConfig, fit_unsupervised
from linalign_jax.errors import LinalignError


def _mixture(rng, n, centres, weights):
    labels = rng.choice(len(centres), size=n, p=weights)
    return centres[labels] + 0.15 * rng.normal(size=(n, centres.shape[1]))


def test_recovers_a_rotation_from_unpaired_samples_of_one_distribution():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 8)) * 2
    weights = rng.dirichlet(np.ones(12) * 2)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    x = _mixture(rng, 1500, centres, weights)              # source texts
    y = _mixture(rng, 1500, centres, weights) @ q + 3.0    # other texts, embedded by a rotated "model"
    affine, info = fit_unsupervised(x, y, UnsupervisedConfig(anchors=12, restarts=10))
    held = _mixture(rng, 300, centres, weights)
    pred = held @ affine.W + affine.b
    assert map_metrics(pred, held @ q + 3.0)["r2"] > 0.9
    np.testing.assert_allclose(affine.W, q, atol=0.15)
    assert info["pseudo_pairs"][-1] > 300


def test_bad_input():
    with pytest.raises(LinalignError, match="rows per side"):
        fit_unsupervised(np.ones((20, 3)), np.ones((20, 3)), UnsupervisedConfig(anchors=8))
    with pytest.raises(LinalignError, match="anchors"):
        UnsupervisedConfig(anchors=0)
