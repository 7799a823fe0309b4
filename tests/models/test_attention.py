"""The fused attention path (jax.nn.dot_product_attention; its XLA implementation on this CPU) equals the explicit
one, in isolation and inside the decoders (full forward, KV-cache decoding) against the transformers fixtures."""
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linalign_jax.errors import LinalignError
from linalign_jax.models import attention, core, load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "decoders"
# GQA + RoPE with q/k norms and a sliding window shorter than the sequence (gemma3), plain llama GQA: every masking
# case (the other families differ from these outside attention).
CASES = ("gemma3_sliding", "llama_gqa")
TOL = 1e-4  # against transformers (test_decoders.py pins the default path to 1e-5)
SAME = 2e-6  # fused vs explicit: the same float32 arithmetic in another order


def random_qkv(rng, batch=2, t=5, s=7, heads=4, kv_heads=2, dim=8, dtype=jnp.float32):
    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)
    return normal(batch, t, heads, dim), normal(batch, s, kv_heads, dim), normal(batch, s, kv_heads, dim)


@pytest.mark.parametrize("mask_heads, bias_heads", [(1, None), (4, None), (None, 4), (1, 1), (1, 4)])
def test_fused_equals_explicit(mask_heads, bias_heads):
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(rng)
    mask = None if mask_heads is None else jnp.asarray(rng.random((2, mask_heads, 5, 7)) > 0.4)
    bias = None if bias_heads is None else jnp.asarray(rng.normal(size=(1, bias_heads, 5, 7)), jnp.float32)
    kwargs = dict(scale=0.3, mask=mask, bias=bias)
    fused = attention.attention(q, k, v, implementation="fused", **kwargs)
    explicit = attention.attention(q, k, v, implementation="explicit", **kwargs)
    assert fused.shape == q.shape
    np.testing.assert_allclose(np.asarray(fused), np.asarray(explicit), atol=SAME, rtol=0)


def test_row_without_visible_keys_is_finite_and_uniform():
    q, k, v = random_qkv(np.random.default_rng(1))
    mask = jnp.ones((2, 1, 5, 7), bool).at[0, :, 2].set(False)
    for implementation in ("fused", "explicit"):
        out = np.asarray(attention.attention(q, k, v, scale=1.0, mask=mask, implementation=implementation))
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out[0, 2], np.asarray(v[0].mean(0)).repeat(2, 0), atol=1e-5)


def test_softcap_only_explicit_and_unknown_implementation():
    q, k, v = random_qkv(np.random.default_rng(2))
    capped = attention.attention(q, k, v, scale=1.0, softcap=0.5)  # auto on CPU: explicit
    assert np.isfinite(np.asarray(capped)).all()
    with pytest.raises(LinalignError, match="soft-capping"):
        attention.attention(q, k, v, scale=1.0, softcap=0.5, implementation="fused")
    with pytest.raises(LinalignError, match="unknown attention implementation"):
        attention.attention(q, k, v, scale=1.0, implementation="flash")
    with pytest.raises(LinalignError, match="unknown attention"):
        dataclasses.replace(load_model(str(FIXTURES / "gpt2")).config, attention="flash")


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model = load_model(str(FIXTURES / request.param))
    return model, dict(np.load(FIXTURES / request.param / "expected.npz"))


def test_decoders_fused_match_explicit_and_transformers(case):
    model, expected = case
    fused = dataclasses.replace(model.config, attention="fused")
    explicit = dataclasses.replace(model.config, attention="explicit")
    assert core.config_hash(fused) == core.config_hash(model.config)  # features cached either way are the same
    # Left padding (padded keys before the real ones); test_decoders.py covers both sides on the default path.
    ids = jnp.asarray(expected["left_input_ids"], jnp.int32)
    mask = jnp.asarray(expected["left_attention_mask"], jnp.int32)
    real = expected["left_attention_mask"].astype(bool)
    got = {cfg.attention: np.asarray(jax.jit(functools.partial(core.forward, cfg))(
        model.params, ids, mask).last_hidden_state)[real] for cfg in (fused, explicit)}
    np.testing.assert_allclose(got["fused"], got["explicit"], atol=SAME * 10, rtol=0)
    np.testing.assert_allclose(got["fused"], expected["left_last_hidden_state"][real], atol=TOL, rtol=0)

def test_fused_kv_cache_decoding_equals_full_forward():
    """Prefill 4 left-padded tokens, then one token per step: the fused path's states equal its full pass (gemma3:
    sliding and global layers)."""
    model = load_model(str(FIXTURES / CASES[0]))
    expected = np.load(FIXTURES / CASES[0] / "expected.npz")
    cfg = dataclasses.replace(model.config, attention="fused")
    ids = jnp.asarray(expected["left_input_ids"], jnp.int32)
    mask = jnp.asarray(expected["left_attention_mask"], jnp.int32)
    full = np.asarray(jax.jit(functools.partial(core.forward, cfg))(model.params, ids, mask).last_hidden_state)
    extend = jax.jit(functools.partial(core.extend, cfg))
    cache = core.init_cache(cfg, ids.shape[0], ids.shape[1])
    out, cache = extend(model.params, ids[:, :4], mask[:, :4], cache)
    steps = [out.last_hidden_state]
    for t in range(4, ids.shape[1]):
        out, cache = extend(model.params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(out.last_hidden_state)
    real = expected["left_attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1))[real], full[real], atol=TOL, rtol=0)
