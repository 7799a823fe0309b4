import jax
import numpy as np
import pytest

from linalign_jax.errors import LinalignError
from linalign_jax.evaluate.heads import HeadConfig, accuracy, train_head

FAST = HeadConfig(max_steps=600)


def _blobs(n, d=16, k=4, seed=0, spread=0.6, offset=10.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    y = rng.integers(0, k, n)
    return (centres[y] + spread * rng.normal(size=(n, d)) + offset).astype(np.float32), y


def test_learns_separable_classes_on_raw_offset_features():
    x, y = _blobs(600)
    head = train_head(x[:400], y[:400], 4, jax.random.key(0), FAST)
    assert accuracy(head, x[400:], y[400:]) > 0.95
    assert head.V.shape == (16, 4) and head.c.shape == (4,)
    # The standardisation is folded in: the head acts on raw features.
    np.testing.assert_allclose(head.logits(x[:3]), x[:3] @ head.V + head.c, rtol=1e-5)


def test_stronger_l2_shrinks_weights_and_seeds_differ():
    x, y = _blobs(300, seed=1)
    weak = train_head(x, y, 4, jax.random.key(0), FAST)
    strong = train_head(x, y, 4, jax.random.key(0), HeadConfig(l2=1.0, max_steps=600))
    assert np.linalg.norm(strong.V) < 0.5 * np.linalg.norm(weak.V)
    other = train_head(x, y, 4, jax.random.key(1), FAST)
    assert not np.array_equal(weak.V, other.V)


def test_bad_input():
    x, y = _blobs(20)
    with pytest.raises(LinalignError, match="labels must lie"):
        train_head(x, y, 2, jax.random.key(0))
    with pytest.raises(LinalignError, match=r"\[N, d\] and labels \[N\]"):
        train_head(x, y[:10], 4, jax.random.key(0))
    x[0, 0] = np.nan
    with pytest.raises(LinalignError, match="NaN"):
        train_head(x, y, 4, jax.random.key(0))
    head = train_head(*_blobs(20), 4, jax.random.key(0), HeadConfig(max_steps=25))
    with pytest.raises(LinalignError, match="head expects features"):
        head.predict(np.zeros((2, 3)))
