import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linalign_jax.align.maps import AffineMap, apply_map, load_map, save_map
from linalign_jax.errors import LinalignError

META = {"source_model": "all-MiniLM-L6-v2", "target_model": "all-mpnet-base-v2", "source_fingerprint": "aaa",
        "target_fingerprint": "bbb", "pooling": "mean", "method": "ridge", "lambda": 0.5, "data_fingerprint": "ddd",
        "metrics": {"r2": 0.7}}


def _map(seed=0):
    rng = np.random.default_rng(seed)
    return AffineMap(W=rng.normal(size=(6, 4)).astype(np.float32), b=rng.normal(size=4).astype(np.float32))


def test_roundtrip_and_metadata(tmp_path):
    m = _map()
    save_map(tmp_path / "m", m, META)
    loaded, meta = load_map(tmp_path / "m", source="aaa", target="all-mpnet-base-v2", source_dim=6, target_dim=4)
    np.testing.assert_array_equal(loaded.W, m.W)
    np.testing.assert_array_equal(loaded.b, m.b)
    assert meta["lambda"] == 0.5 and meta["metrics"] == {"r2": 0.7}
    assert (meta["source_dim"], meta["target_dim"]) == (6, 4)


def test_apply_is_affine_for_numpy_and_jax():
    m = _map()
    x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(apply_map(m, x), x @ m.W + m.b, rtol=1e-6)
    jitted = jax.jit(lambda p, v: p(v))(m, jnp.asarray(x))  # AffineMap is a pytree
    np.testing.assert_allclose(np.asarray(jitted), x @ m.W + m.b, rtol=1e-5)
    with pytest.raises(LinalignError, match="source features of dim 6"):
        apply_map(m, x[:, :5])


def test_mismatched_models_or_dims_are_rejected(tmp_path):
    save_map(tmp_path / "m", _map(), META)
    with pytest.raises(LinalignError, match="source model"):
        load_map(tmp_path / "m", source="some-other-model")
    with pytest.raises(LinalignError, match="target model"):
        load_map(tmp_path / "m", target="zzz")
    with pytest.raises(LinalignError, match="target_dim=4"):
        load_map(tmp_path / "m", target_dim=768)


def test_broken_map_directories(tmp_path):
    with pytest.raises(LinalignError, match="not a saved map"):
        load_map(tmp_path / "missing")
    save_map(tmp_path / "m", _map(), META)
    meta_path = tmp_path / "m" / "map.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "source_dim": 7}))
    with pytest.raises(LinalignError, match="disagree with metadata"):
        load_map(tmp_path / "m")
    meta_path.write_text("{not json")
    with pytest.raises(LinalignError, match="unreadable"):
        load_map(tmp_path / "m")


def test_save_is_atomic_on_failure(tmp_path):
    with pytest.raises(TypeError):
        save_map(tmp_path / "m", _map(), {"bad": object()})
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []


def test_map_json_is_strict_json(tmp_path):
    affine = AffineMap(W=np.eye(3, dtype=np.float32), b=np.zeros(3, np.float32))
    with pytest.raises(LinalignError, match="non-finite"):
        save_map(tmp_path / "m", affine, {"best_val_loss": float("nan")})
    assert not (tmp_path / "m").exists()
    save_map(tmp_path / "m", affine, {"best_val_loss": 0.5})
    json.loads((tmp_path / "m" / "map.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
