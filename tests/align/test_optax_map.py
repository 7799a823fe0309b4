import logging

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


def test_default_gradient_descent_reaches_the_least_squares_solution():
    x, y = _data()
    m, info = fit_optax_map(x, y, jax.random.key(0), OptaxMapConfig(patience=50))
    exact, _ = fit_ridge(x, y, 1e-6)
    assert map_metrics(m(x), y)["r2"] == pytest.approx(map_metrics(exact(x), y)["r2"], abs=1e-3)
    assert info["converged"] and not info["diverged"]
    assert info["best_epoch"] < info["epochs_run"] - 1


def test_l2_auto_converges_to_the_gcv_ridge_map_and_ridge_init_starts_there():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 20)).astype(np.float32)
    y = (x @ rng.normal(size=(20, 4)) + 2.0 * rng.normal(size=(300, 4))).astype(np.float32)
    config = OptaxMapConfig(l2="auto", val_fraction=0.1, patience=400, max_epochs=400, momentum=0.9)
    m, info = fit_optax_map(x, y, jax.random.key(0), config)
    started, start_info = fit_optax_map(x, y, jax.random.key(0), OptaxMapConfig(init="ridge", max_epochs=1))
    # the same training rows (same key → same split) under ridge's penalty: the optimum is the GCV ridge map
    order = np.asarray(jax.random.permutation(jax.random.split(jax.random.key(0))[1], 300))
    ridge, _ = fit_ridge(x[order[30:]], y[order[30:]], "auto")
    # (the returned map is the best held-out epoch, so near the optimum rather than at it)
    assert np.linalg.norm(m.W - ridge.W) < 0.02 * np.linalg.norm(ridge.W)
    assert start_info["initial_val_loss"] == pytest.approx(
        float(((ridge(x[order[:30]]) - y[order[:30]]) ** 2).sum(1).mean()), rel=1e-4)


def test_cosine_loss_with_adamw_aligns_directions():
    x, y = _data(seed=1)
    config = OptaxMapConfig(loss="cosine", optimizer="adamw", learning_rate=0.05, batch_size=256, max_epochs=80)
    m, info = fit_optax_map(x, y, jax.random.key(1), config)
    assert map_metrics(m(x), y)["cosine"] > 0.99
    assert info["loss"] == "cosine" and info["optimizer"] == "adamw"


def test_early_stopping_stops_on_a_plateau():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = rng.normal(size=(400, 3)).astype(np.float32)  # nothing to learn: held-out loss stops improving quickly
    _, info = fit_optax_map(x, y, jax.random.key(0), OptaxMapConfig(max_epochs=500, patience=3))
    assert info["epochs_run"] < 500
    assert info["epochs_run"] - 1 - info["best_epoch"] == 3


def test_cut_off_training_warns_and_divergence_keeps_the_start(caplog):
    x, y = _data(n=200)
    with caplog.at_level(logging.WARNING, logger="linalign_jax.align.optax_map"):
        _, info = fit_optax_map(x, y, jax.random.key(0), OptaxMapConfig(learning_rate=0.01, max_epochs=3))
    assert not info["converged"] and "still improving" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="linalign_jax.align.optax_map"):
        m, info = fit_optax_map(x, y, jax.random.key(0), OptaxMapConfig(learning_rate=1e4, max_epochs=50))
    assert info["diverged"] and info["best_epoch"] == -1 and "non-finite" in caplog.text
    np.testing.assert_array_equal(m.W, 0.0)  # the best finite map is the start: W = 0, b = mean(y)
    assert np.isfinite(info["best_val_loss"])


def test_same_key_same_map_other_key_other_map():
    x, y = _data(n=200)
    config = OptaxMapConfig(max_epochs=3, batch_size=32)
    a, _ = fit_optax_map(x, y, jax.random.key(3), config)
    b, _ = fit_optax_map(x, y, jax.random.key(3), config)
    c, _ = fit_optax_map(x, y, jax.random.key(4), config)
    np.testing.assert_array_equal(a.W, b.W)
    assert not np.array_equal(a.W, c.W)


@pytest.mark.parametrize("field,value,match", [
    ("loss", "l1", "loss"), ("optimizer", "rmsprop", "optimizer"), ("val_fraction", 1.0, "val_fraction"),
    ("learning_rate", float("nan"), "learning_rate must be a finite"), ("learning_rate", float("inf"), "finite"),
    ("learning_rate", 0.0, "learning_rate must be > 0"), ("l2", -1.0, "l2"), ("max_epochs", 0, "max_epochs"),
    ("schedule", "step", "schedule"), ("init", "random", "init"), ("momentum", float("nan"), "momentum")])
def test_bad_config(field, value, match):
    with pytest.raises(LinalignError, match=match):
        OptaxMapConfig(**{field: value})


def test_bad_input():
    x, y = _data(n=50)
    with pytest.raises(LinalignError, match="N=50 vs N=40"):
        fit_optax_map(x, y[:40], jax.random.key(0))
    x[0, 0] = np.inf
    with pytest.raises(LinalignError, match="NaN or Inf"):
        fit_optax_map(x, y, jax.random.key(0))
