import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from linalign_jax.align.fit import MapConfig, fit_map
from linalign_jax.align.ridge import (accumulate_stats, batch_stats, eigensystem, fit_ridge, gcv_curve,
                                      iterate_batches, merge_stats, solve_reduced_rank, solve_ridge)
from linalign_jax.errors import LinalignError


def _data(n=400, dx=24, dy=16, offset=3.0, noise=0.3, seed=0, mixing=0.3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dx)) @ (np.eye(dx) + mixing * rng.normal(size=(dx, dx))) + offset
    y = x @ rng.normal(size=(dx, dy)) - 1.5 + noise * rng.normal(size=(n, dy))
    return x, y


def _reference(x, y, lam):
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    W = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
    return W, my - mx @ W


@pytest.mark.parametrize("batch_size", [7, 64, 400])
def test_streamed_float64_matches_closed_form(batch_size):
    x, y = _data()
    affine, info = fit_ridge(x, y, 0.5, batch_size=batch_size)
    W, b = _reference(x, y, 0.5)
    assert info["lambda"] == 0.5
    np.testing.assert_allclose(affine.W, W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(affine.b, b, rtol=1e-5, atol=1e-5)


def test_float32_xla_path_agrees_despite_large_offset():
    # Well-conditioned features (the float32 Gram's error is amplified by cond(XᵀX + λI)) far from the origin: without
    # the shift, float32 cancellation in XᵀX − n x̄x̄ᵀ would lose most digits.
    x, y = _data(n=3000, offset=50.0, mixing=0.3 / np.sqrt(24))
    W, _ = _reference(x, y, 1.0)
    affine, _ = fit_ridge(x.astype(np.float32), y.astype(np.float32), 1.0, batch_size=512, precision="float32")
    assert np.linalg.norm(affine.W - W) / np.linalg.norm(W) < 1e-5


def test_merge_rebases_different_shifts():
    x, y = _data()
    whole = batch_stats(x, y)
    a = batch_stats(x[:150], y[:150])  # each part is shifted by its own means
    b = batch_stats(x[150:], y[150:])
    merged = merge_stats(a, b)
    for got, want in zip(merged.centered(), whole.centered()):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(merged.mean_x(), x.mean(0), rtol=1e-12)


def test_gcv_curve_matches_explicit_hat_matrix():
    x, y = _data(n=60, dx=5, dy=3, noise=1.0)
    eig = eigensystem(batch_stats(x, y))
    lambdas = [0.01, 1.0, 30.0]
    xc, yc = x - x.mean(0), y - y.mean(0)
    want = []
    for lam in lambdas:
        hat = xc @ np.linalg.solve(xc.T @ xc + lam * np.eye(5), xc.T)
        rss = ((yc - hat @ yc) ** 2).sum()
        want.append(60 * rss / (60 - 1 - np.trace(hat)) ** 2)
    np.testing.assert_allclose(gcv_curve(eig, lambdas), want, rtol=1e-8)


def test_auto_lambda_is_the_gcv_minimiser_and_shrinks_more_under_noise():
    clean, noisy = _data(noise=0.01), _data(noise=20.0)
    _, info_clean = solve_ridge(batch_stats(*clean), "auto")
    _, info_noisy = solve_ridge(batch_stats(*noisy), "auto")
    assert info_clean["lambda"] == info_clean["lambda_grid"][int(np.argmin(info_clean["gcv"]))]
    assert info_noisy["lambda"] > 10 * info_clean["lambda"]


def test_reduced_rank():
    x, y = _data()
    stats = batch_stats(x, y)
    low, info = solve_reduced_rank(stats, 3, 1.0)
    assert np.linalg.matrix_rank(low.W, tol=1e-4) == 3 and info["rank"] == 3
    full, _ = solve_reduced_rank(stats, 16, 1.0)
    ridge, _ = solve_ridge(stats, 1.0)
    np.testing.assert_allclose(full.W, ridge.W, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf"), "bogus"])
def test_bad_lambda(lam):
    x, y = _data(n=50)
    with pytest.raises(LinalignError, match="lambda"):
        solve_ridge(batch_stats(x, y), lam)


def test_bad_inputs():
    x, y = _data(n=50)
    with pytest.raises(LinalignError, match="N=50 vs N=49"):
        fit_ridge(x, y[:49], 1.0)
    for bad in (np.nan, np.inf):
        xb = x.copy()
        xb[3, 2] = bad
        with pytest.raises(LinalignError, match="NaN or Inf"):
            fit_ridge(xb, y, 1.0)
        with pytest.raises(LinalignError, match="NaN or Inf"):
            fit_ridge(xb.astype(np.float32), y.astype(np.float32), 1.0, precision="float32")
    with pytest.raises(LinalignError, match="rank"):
        solve_reduced_rank(batch_stats(x, y), 17, 1.0)
    with pytest.raises(LinalignError, match="rank"):
        solve_reduced_rank(batch_stats(x, y), 0, 1.0)
    with pytest.raises(LinalignError, match="unknown map method"):
        MapConfig(method="lasso")
    with pytest.raises(LinalignError, match="lambda"):
        MapConfig(ridge_lambda=-2.0)
    with pytest.raises(LinalignError, match="2-D"):
        fit_ridge(x[:, 0], y, 1.0)


def test_fit_map_with_base_stats_equals_fit_on_concatenation():
    x, y = _data()
    config = MapConfig(ridge_lambda=0.3, batch_size=100)
    base = accumulate_stats(iterate_batches(x[:300], y[:300], 100))
    combined, _ = fit_map(x[300:], y[300:], config, base_stats=base)
    whole, _ = fit_map(x, y, config)
    np.testing.assert_allclose(combined.W, whole.W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combined.b, whole.b, rtol=1e-5, atol=1e-5)


def test_sharded_over_four_devices_matches_single_device():
    """Row-sharded statistics and data-parallel optax training on 4 forced host devices (fresh process: the device
    count is fixed when JAX starts)."""
    script = textwrap.dedent("""
        import jax, numpy as np
        assert jax.device_count() == 4
        from linalign_jax.align.ridge import fit_ridge
        from linalign_jax.align.optax_map import OptaxMapConfig, fit_optax_map
        rng = np.random.default_rng(0)
        x = rng.normal(size=(1001, 12)).astype(np.float32) + 2
        y = (x @ rng.normal(size=(12, 6)) + 0.1 * rng.normal(size=(1001, 6))).astype(np.float32)
        sharded, _ = fit_ridge(x, y, 0.1, batch_size=333, precision="float32")
        exact, _ = fit_ridge(x, y, 0.1, precision="float64")
        assert np.linalg.norm(sharded.W - exact.W) / np.linalg.norm(exact.W) < 1e-5
        m, info = fit_optax_map(x, y, jax.random.key(0), OptaxMapConfig(learning_rate=0.05, max_epochs=60))
        assert np.abs(m.W - exact.W).max() < 0.05, np.abs(m.W - exact.W).max()
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_kfold_cv_curve_equals_refitting_every_fold():
    from linalign_jax.align.ridge import GCV_GRID, cv_curve, eigensystem, fold_statistics

    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 6)) + 3.0
    y = x @ rng.normal(size=(6, 3)) + rng.normal(size=(120, 3))
    relative = GCV_GRID[::10]
    fast = cv_curve(fold_statistics(x, y, 3), relative)
    parts = np.array_split(np.random.default_rng(0).permutation(120), 3)  # fold_statistics' partition
    slow = np.zeros(len(relative))
    for part in parts:
        train = np.setdiff1d(np.arange(120), part)
        xt, yt = x[train], y[train]
        xc = xt - xt.mean(0)
        scale = np.linalg.eigvalsh(xc.T @ xc).mean()
        for i, rel in enumerate(relative):
            W = np.linalg.solve(xc.T @ xc + rel * scale * np.eye(6), xc.T @ (yt - yt.mean(0)))
            slow[i] += ((y[part] - (x[part] - xt.mean(0)) @ W - yt.mean(0)) ** 2).sum()
    np.testing.assert_allclose(fast, slow, rtol=1e-9)


def test_cv_lambda_through_fit_map_and_the_flag_parser():
    from linalign_jax.align.ridge import parse_lambda

    x, y = _data(n=300, noise=0.5)
    affine, info = fit_map(x, y, MapConfig(ridge_lambda="cv", cv_folds=4))
    assert info["lambda_selection"] == "cv4" and info["lambda"] > 0 and len(info["cv_sse"]) == len(info["lambda_grid"])
    assert np.argmin(info["cv_sse"]) == info["lambda_grid"].index(info["lambda"])
    fixed, _ = fit_map(x, y, MapConfig(ridge_lambda=info["lambda"]))
    np.testing.assert_allclose(affine.W, fixed.W, atol=1e-6)
    assert parse_lambda("cv", allow_cv=True) == "cv"
    with pytest.raises(LinalignError, match="'auto'"):
        parse_lambda("cv")
    with pytest.raises(LinalignError, match="folds"):
        fit_map(x, y, MapConfig(ridge_lambda="cv", cv_folds=1))
