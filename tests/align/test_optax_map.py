import jax
import numpy as np
import pytest

from linalign_jax.align.metrics import map_metrics
from linalign_jax.align.optax_map import OptaxMapConfig, fit_optax_map
from linalign_jax.align.ridge import fit_ridge
from linalign_jax.errors import LinalignError


def _data(n=600, dx=10, dy=6, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, dx)) * rng.uniform(0.2, 3.0, size=dx) + 5.0).astype(np.float32)
    y = (x @ rng.normal(size=(dx, dy)) + 0.05 * rng.normal(size=(n, dy)) - 2.0).astype(np.float32)
    return x, y


def test_mse_map_reaches_the_least_squares_solution():
    x, y = _data()
    config = OptaxMapConfig(learning_rate=0.05, batch_size=64, max_epochs=150, patience=10)
    m, info = fit_optax_map(x, y, jax.random.key(0), config)
    exact, _ = fit_ridge(x, y, 1e-6)
    np.testing.assert_allclose(m(x), exact(x), atol=0.05)
    assert map_metrics(m(x), y)["r2"] == pytest.approx(map_metrics(exact(x), y)["r2"], abs=1e-3)
    assert info["best_epoch"] < info["epochs_run"] <= 150


def test_cosine_loss_with_adamw_aligns_directions():
    x, y = _data(seed=1)
    config = OptaxMapConfig(loss="cosine", optimizer="adamw", learning_rate=0.05, max_epochs=80)
    m, info = fit_optax_map(x, y, jax.random.key(1), config)
    assert map_metrics(m(x), y)["cosine"] > 0.99
    assert info["loss"] == "cosine" and info["optimizer"] == "adamw"


def test_early_stopping_stops_on_a_plateau():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = rng.normal(size=(400, 3)).astype(np.float32)  # nothing to learn: held-out loss stops improving quickly
    _, info = fit_optax_map(x, y, jax.random.key(0), OptaxMapConfig(learning_rate=0.05, max_epochs=500, patience=3))
    assert info["epochs_run"] < 500
    assert info["epochs_run"] - 1 - info["best_epoch"] == 3


def test_same_key_same_map_other_key_other_map():
    x, y = _data(n=200)
    config = OptaxMapConfig(max_epochs=3)
    a, _ = fit_optax_map(x, y, jax.random.key(3), config)
    b, _ = fit_optax_map(x, y, jax.random.key(3), config)
    c, _ = fit_optax_map(x, y, jax.random.key(4), config)
    np.testing.assert_array_equal(a.W, b.W)
    assert not np.array_equal(a.W, c.W)


def test_bad_config_and_input():
    with pytest.raises(LinalignError, match="loss"):
        OptaxMapConfig(loss="l1")
    with pytest.raises(LinalignError, match="optimizer"):
        OptaxMapConfig(optimizer="sgd")
    with pytest.raises(LinalignError, match="val_fraction"):
        OptaxMapConfig(val_fraction=1.0)
    x, y = _data(n=50)
    with pytest.raises(LinalignError, match="N=50 vs N=40"):
        fit_optax_map(x, y[:40], jax.random.key(0))
    x[0, 0] = np.inf
    with pytest.raises(LinalignError, match="NaN or Inf"):
        fit_optax_map(x, y, jax.random.key(0))
