import numpy as np
import pytest

from linalign_jax.align.procrustes import fit_procrustes
from linalign_jax.errors import LinalignError


def test_recovers_rotation_scale_and_offset():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    y = 2.5 * x @ q + 4.0
    m, info = fit_procrustes(x, y)
    np.testing.assert_allclose(m.W, 2.5 * q, atol=1e-5)
    np.testing.assert_allclose(m.b, 4.0, atol=1e-4)
    assert info["scale"] == pytest.approx(2.5, rel=1e-6)


@pytest.mark.parametrize("dims", ["zero", "pca"])
@pytest.mark.parametrize("dx,dy", [(10, 6), (6, 10)])
def test_different_dims_give_semi_orthogonal_maps(dims, dx, dy):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, dx)), rng.normal(size=(200, dy))
    m, _ = fit_procrustes(x, y, dims=dims, scale=False)
    assert m.W.shape == (dx, dy)
    small = min(dx, dy)
    gram = m.W.T @ m.W if dx > dy else m.W @ m.W.T
    np.testing.assert_allclose(gram, np.eye(small), atol=1e-5)


def test_bad_input():
    x = np.ones((5, 3))
    with pytest.raises(LinalignError, match="dims mode"):
        fit_procrustes(x, x, dims="crop")
    with pytest.raises(LinalignError, match="N=5 vs N=4"):
        fit_procrustes(x, x[:4])
    x[0, 0] = np.nan
    with pytest.raises(LinalignError, match="NaN"):
        fit_procrustes(x, np.ones((5, 3)))


def test_plain_rotation_keeps_centring_and_bias():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)) + 7.0
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    m, info = fit_procrustes(x, 3.0 * (x - x.mean(0)) @ q - 2.0, scale=False)
    np.testing.assert_allclose(m.W, q, atol=1e-5)  # s = 1: the rotation alone
    np.testing.assert_allclose(m.b, -2.0 - x.mean(0) @ q, atol=1e-4)
    assert info["procrustes_scale"] is False and info["scale"] == 1.0
