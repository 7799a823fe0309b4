import jax
import numpy as np
import pytest

from linalign_jax.align.fit import MapConfig
from linalign_jax.errors import LinalignError
from linalign_jax.evaluate.heads import HeadConfig
from linalign_jax.evaluate.settings import SETTINGS, Paired, TaskFeatures, run_settings, sample_shots, setting_ids

K = 3


def _features(seed=0):
    """Target = class structure in 12 dims; source = a noisy linear image of it in 10 dims; OOD = no class structure."""
    rng = np.random.default_rng(seed)
    centres, A = 2.0 * rng.normal(size=(K, 12)), rng.normal(size=(12, 10))

    def make(n, ood=False):
        y = rng.integers(0, K, n)
        z = (rng.normal(size=(n, 12)) * 2.0 if ood else centres[y]) + 0.5 * rng.normal(size=(n, 12))
        return Paired((z @ A + 0.2 * rng.normal(size=(n, 10))).astype(np.float32), z.astype(np.float32)), y

    (train, ytr), (test, yte) = make(300), make(150)
    return TaskFeatures(train, ytr, test, yte, K, ood=make(100, ood=True)[0], public=make(200, ood=True)[0])


def test_all_settings_over_three_seeds():
    feats = _features()
    ids = setting_ids([s for s in SETTINGS if s != "unsupervised"], [6, 12])
    assert ids == ["native", "task_map", "public", "public+id@6", "public+id@12", "few_shot@6", "few_shot@12"]
    saved = []
    res = run_settings(feats, ids, [0, 1, 2], MapConfig(), HeadConfig(max_steps=300),
                       on_map=lambda sid, m, info: saved.append(sid))
    assert list(res) == ids
    assert saved == ["task_map", "public", "public+id@6", "public+id@12"]  # first seed only
    for sid, entry in res.items():
        assert len(entry["per_seed"]) == 3 and [r["seed"] for r in entry["per_seed"]] == [0, 1, 2]
        accs = [r["accuracy"] for r in entry["per_seed"]]
        assert entry["mean"]["accuracy"] == pytest.approx(np.mean(accs))
        assert entry["std"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))
        assert 0.0 <= entry["mean"]["energy_auroc"] <= 1.0
    assert res["native"]["mean"]["accuracy"] > 0.95
    assert res["task_map"]["mean"]["accuracy"] > res["native"]["mean"]["accuracy"] - 0.05
    assert res["task_map"]["mean"]["map"]["r2"] > 0.8
    assert res["public+id@12"]["per_seed"][0]["map"]["map_rows"] == 212
    assert res["public+id@12"]["std"]["map"]["r2"] > 0  # fresh shots, hence a fresh map, per seed
    assert res["public"]["std"]["map"]["r2"] == 0        # closed-form map on fixed rows: fitted once
    assert res["few_shot@6"]["per_seed"][0]["head_rows"] == 6


def test_sample_shots_total_and_per_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    total = sample_shots(labels, 10, K, jax.random.key(0))
    assert np.bincount(labels[total]).tolist() == [5, 3, 2]  # stratified
    per = sample_shots(labels, 7, K, jax.random.key(0), per_class=True)
    assert np.bincount(labels[per]).tolist() == [7, 7, 7]
    assert not np.array_equal(per, sample_shots(labels, 7, K, jax.random.key(1), per_class=True))
    with pytest.raises(LinalignError, match="smallest class"):
        sample_shots(labels, 21, K, jax.random.key(0), per_class=True)
    with pytest.raises(LinalignError, match="100 rows"):
        sample_shots(labels, 100, K, jax.random.key(0))


def test_bad_settings():
    with pytest.raises(LinalignError, match="unknown setting"):
        setting_ids(["native", "zero_shot"], [8])
    feats = _features()
    no_public = TaskFeatures(feats.train, feats.train_labels, feats.test, feats.test_labels, K)
    with pytest.raises(LinalignError, match="public-corpus features"):
        run_settings(no_public, ["public"], [0], MapConfig())
    with pytest.raises(LinalignError, match="disagree on N"):
        Paired(np.zeros((3, 2)), np.zeros((4, 2)))


def test_unsupervised_setting_fits_on_unpaired_halves(monkeypatch):
    from linalign_jax.evaluate import settings as settings_module

    rng = np.random.default_rng(0)
    seen = {}

    def fake_fit(x, y):  # records what the fitter is given; returns the identity-like least-squares map
        seen["x"], seen["y"] = x, y
        from linalign_jax.align.maps import AffineMap
        return AffineMap(W=np.eye(x.shape[1], y.shape[1], dtype=np.float32), b=np.zeros(y.shape[1], np.float32)), {}

    monkeypatch.setattr(settings_module, "fit_unsupervised", fake_fit)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(int)
    feats = settings_module.TaskFeatures(train=settings_module.Paired(x[:40], x[:40]), train_labels=labels[:40],
                                         test=settings_module.Paired(x[40:], x[40:]), test_labels=labels[40:],
                                         num_classes=2, public=settings_module.Paired(x, x + 1))
    out = settings_module.run_settings(feats, ["unsupervised"], [0, 1], settings_module.MapConfig())
    np.testing.assert_array_equal(seen["x"], x[:40])
    np.testing.assert_array_equal(seen["y"], x[40:] + 1)   # the other half: no text on both sides
    assert len(out["unsupervised"]["per_seed"]) == 2 and out["unsupervised"]["per_seed"][0]["map"]["map_rows"] == 80
