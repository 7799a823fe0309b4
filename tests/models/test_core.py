"""The shared decoder core and checkpoint plumbing, on random weights (no HF fixtures needed)."""
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from linalign_jax.errors import LinalignError
from linalign_jax.models import checkpoint, core, gemma3, llama

# Jitted once per config (eager Flax over nn.scan is slow); config and the hidden-states flag are static.
forward = jax.jit(core.forward, static_argnums=(0, 4))
lm_head = jax.jit(core.lm_head, static_argnums=(0,))
extend = jax.jit(core.extend, static_argnums=(0, 5))
init_params = jax.jit(core.init_params, static_argnums=(0, 2))

TINY = core.DecoderConfig(family="llama", vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=4, intermediate_size=24, max_position_embeddings=64, tie_embeddings=False)


# ------------------------------------------------------------------------------------------------------ RoPE

def test_default_rope_frequencies():
    inv_freq, scale = core.RopeConfig(theta=10000.0).inverse_frequencies(8)
    np.testing.assert_allclose(inv_freq, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
    assert scale == 1.0


def test_linear_rope_divides_frequencies():
    base, _ = core.RopeConfig().inverse_frequencies(16)
    scaled, _ = core.RopeConfig(kind="linear", factor=4.0).inverse_frequencies(16)
    np.testing.assert_allclose(scaled, base / 4, rtol=1e-6)


def test_llama3_rope_keeps_high_and_scales_low_frequencies():
    rope = core.RopeConfig(theta=500000.0, kind="llama3", factor=8.0, original_max_position_embeddings=8192)
    base, _ = core.RopeConfig(theta=500000.0).inverse_frequencies(128)
    scaled, _ = rope.inverse_frequencies(128)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4.0   # short wavelengths: unchanged
    low = wavelen > 8192 / 1.0    # long wavelengths: divided by the factor
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8.0)


def test_yarn_rope_attention_factor_and_ramp():
    rope = core.RopeConfig(kind="yarn", factor=4.0, original_max_position_embeddings=4096)
    base, _ = core.RopeConfig().inverse_frequencies(64)
    scaled, scale = rope.inverse_frequencies(64)
    assert scale == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert scaled[0] == pytest.approx(base[0])              # fastest rotation: extrapolated (kept)
    assert scaled[-1] == pytest.approx(base[-1] / 4.0)      # slowest: interpolated (scaled)
    assert np.all(np.diff(scaled / base) <= 1e-7)           # a monotone ramp between the two


def test_unknown_rope_type():
    with pytest.raises(LinalignError, match="dynamic.*default, linear, llama3, yarn"):
        core.RopeConfig(kind="dynamic")


def test_rope_from_both_config_generations():
    v4 = {"rope_theta": 5e5, "max_position_embeddings": 1024,
          "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 256}}
    v5 = {"max_position_embeddings": 1024,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}
    assert llama.rope_from_hf(v4) == llama.rope_from_hf(v5)
    gemma_v4 = {"rope_theta": 1e6, "rope_local_base_freq": 1e4}
    assert llama.rope_from_hf(gemma_v4, core.SLIDING).theta == 1e4
    assert llama.rope_from_hf(gemma_v4, core.FULL).theta == 1e6


def test_gemma3_config_defaults_its_layer_pattern():
    hf = {"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 12,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 16,
          "sliding_window": 4, "rope_theta": 1e6}
    cfg = gemma3.config_from_hf(hf)
    assert [i for i, t in enumerate(cfg.layer_types) if t == core.FULL] == [5, 11]
    assert cfg.local_rope.theta == 10000.0 and cfg.tie_embeddings and cfg.scale == 0.5


# -------------------------------------------------------------------------------------------------- attention

def test_attention_masks_padding_future_and_window():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 4, 2, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 4, 1, 3)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 4, 1, 3)), jnp.float32)
    pos = jnp.asarray([[-1, 0, 1, 2]])  # slot 0 is padding
    full = core.attend(q, k, v, pos, pos, None, 1.0, None)
    windowed = core.attend(q, k, v, pos, pos, 2, 1.0, None)
    # The query at position 0 sees only itself, so its output is its own value.
    np.testing.assert_allclose(full[0, 1].reshape(2, 3), np.asarray(v[0, 1]).repeat(2, 0), atol=1e-6)
    # Position 2 with window 2 sees positions 1 and 2 only: equal to attending over those two slots.
    sub = core.attend(q[:, 3:], k[:, 2:], v[:, 2:], pos[:, 3:], pos[:, 2:], None, 1.0, None)
    np.testing.assert_allclose(windowed[0, 3], sub[0, 0], atol=1e-6)
    assert not np.allclose(full[0, 3], windowed[0, 3])
    assert np.isfinite(np.asarray(full)).all()  # the padding query sees nothing and still gives finite values


# ----------------------------------------------------------------------------------- forward and the KV cache

@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.PRNGKey(0))


def test_padding_does_not_change_real_tokens(tiny_params):
    ids = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    alone = forward(TINY, tiny_params, ids, jnp.ones_like(ids)).last_hidden_state
    left = forward(TINY, tiny_params, jnp.asarray([[0, 0, 5, 6, 7, 8]], jnp.int32),
                        jnp.asarray([[0, 0, 1, 1, 1, 1]], jnp.int32)).last_hidden_state
    right = forward(TINY, tiny_params, jnp.asarray([[5, 6, 7, 8, 0, 0]], jnp.int32),
                         jnp.asarray([[1, 1, 1, 1, 0, 0]], jnp.int32)).last_hidden_state
    np.testing.assert_allclose(left[:, 2:], alone, atol=1e-5)
    np.testing.assert_allclose(right[:, :4], alone, atol=1e-5)


@pytest.mark.parametrize("variant", ["gemma_like", "gpt2_like"])
def test_cached_steps_equal_full_forward(variant):
    """Sliding local + global layers with two RoPE bases and soft-capping, or learned positions with LayerNorm."""
    if variant == "gemma_like":
        cfg = dataclasses.replace(
            TINY, family="gemma3", layer_types=(core.SLIDING, core.FULL), sliding_window=3, qk_norm=True,
            sandwich_norms=True, norm_unit_offset=True, embed_scale=True, activation="gelu_tanh",
            local_rope=core.RopeConfig(theta=100.0), attn_logit_softcap=5.0, final_logit_softcap=3.0,
            tie_embeddings=True)
    else:
        cfg = dataclasses.replace(TINY, family="gpt2", norm="layer", gated_mlp=False, qkv_bias=True, out_bias=True,
                                  learned_positions=True, num_kv_heads=4, activation="gelu_tanh")
    params = init_params(cfg, jax.random.PRNGKey(1))
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 1, cfg.vocab_size)
    mask = jnp.asarray([[1] * 9, [0, 0, 0] + [1] * 6], jnp.int32)
    full = lm_head(cfg, params, forward(cfg, params, ids, mask).last_hidden_state)
    cache = core.init_cache(cfg, 2, 12)
    out, cache = extend(cfg, params, ids[:, :4], mask[:, :4], cache)
    pieces = [out.last_hidden_state]
    for t in range(4, 9):
        out, cache = extend(cfg, params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        pieces.append(out.last_hidden_state)
    steps = lm_head(cfg, params, jnp.concatenate(pieces, axis=1))
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(steps)[real], np.asarray(full)[real], atol=1e-5)
    head_kernel = core.with_head_kernel(cfg, params)  # the fast-path head gives the same logits
    np.testing.assert_allclose(lm_head(cfg, head_kernel, pieces[-1]), steps[:, -1:], atol=1e-5)


def test_cache_overflow_is_an_error(tiny_params):
    cache = core.init_cache(TINY, 1, 4)
    ids = jnp.ones((1, 5), jnp.int32)
    with pytest.raises(LinalignError, match="overflow.*max_length 4"):
        core.extend(TINY, tiny_params, ids, jnp.ones_like(ids), cache)


def test_config_validation():
    with pytest.raises(LinalignError, match="float16"):
        dataclasses.replace(TINY, dtype="float16")
    with pytest.raises(LinalignError, match="multiple of num_kv_heads"):
        dataclasses.replace(TINY, num_kv_heads=3)
    with pytest.raises(LinalignError, match="sliding_window"):
        dataclasses.replace(TINY, layer_types=(core.SLIDING, core.FULL))


# --------------------------------------------------------------------------------------------- checkpoints

def test_safetensors_roundtrip_with_bfloat16(tmp_path):
    import ml_dtypes

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, ml_dtypes.bfloat16)}
    checkpoint.write_safetensors(tmp_path / "x.safetensors", tensors)
    back = checkpoint.read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(back["a"], tensors["a"])
    assert back["b"].dtype == ml_dtypes.bfloat16 and np.array_equal(back["b"], tensors["b"])


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(LinalignError, match="unreadable safetensors header"):
        checkpoint.read_safetensors(tmp_path / "x.safetensors")


def test_sharded_index(tmp_path):
    checkpoint.write_safetensors(tmp_path / "s1.safetensors", {"a": np.zeros(2, np.float32)})
    checkpoint.write_safetensors(tmp_path / "s2.safetensors", {"b": np.ones(2, np.float32)})
    (tmp_path / checkpoint.INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                             "b": "s2.safetensors"}}))
    assert sorted(checkpoint.read_checkpoint(tmp_path)) == ["a", "b"]
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(LinalignError, match="missing shard"):
        checkpoint.read_checkpoint(tmp_path)


def test_rules_stack_layers_transpose_and_split():
    rules = (("w.{i}", "lin/kernel", "T"), ("fused.{i}", "attn/{qkv}_proj/kernel", "split3"), ("e", "embed", ""))
    tensors = {"w.0": np.ones((3, 2)), "w.1": np.zeros((3, 2)), "fused.0": np.arange(6.0).reshape(1, 6),
               "fused.1": np.arange(6.0).reshape(1, 6), "e": np.ones(2)}
    params = checkpoint.params_from_tensors(tensors, rules, 2, np.float32)
    assert params["layers"]["lin"]["kernel"].shape == (2, 2, 3)
    np.testing.assert_array_equal(params["layers"]["attn"]["k_proj"]["kernel"][0], [[2.0, 3.0]])
    with pytest.raises(LinalignError, match="lacks w.1"):
        checkpoint.params_from_tensors({k: v for k, v in tensors.items() if k != "w.1"}, rules, 2, np.float32)
    with pytest.raises(LinalignError, match="no rule maps"):
        checkpoint.params_from_tensors({**tensors, "extra": np.ones(1)}, rules, 2, np.float32)


def test_file_hash_is_memoised(tmp_path, monkeypatch):
    monkeypatch.setenv("LINALIGN_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    first = checkpoint.cached_sha256(f)
    assert len(list((tmp_path / "cache" / "hashes").iterdir())) == 1
    assert checkpoint.cached_sha256(f) == first
    f.write_bytes(b"other weights")  # size (and mtime) change: a new hash
    assert checkpoint.cached_sha256(f) != first


# ---------------------------------------------------------------------------------------------- mixture of experts

MOE_BASE = dataclasses.replace(TINY, hidden_size=8, moe=core.MoeConfig(num_experts=4, top_k=2, expert_size=6))


def _moe_reference(params, x, moe):
    """The definition, token by token in float64: sum over the top-k experts of weight * gated MLP (+ shared)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    out = np.zeros(x.shape, np.float64)
    for idx in np.ndindex(x.shape[:-1]):
        h = np.asarray(x[idx], np.float64)
        logits = h @ p["router"]["kernel"]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = np.argsort(-probs)[:moe.top_k]
        weights = probs[top] / (probs[top].sum() if moe.normalize_top_k else 1.0)
        for e, w in zip(top, weights):
            out[idx] += w * (silu(h @ p["experts_gate_proj"][e]) * (h @ p["experts_up_proj"][e])) @ p[
                "experts_down_proj"][e]
        if moe.shared_expert_size:
            s = p["shared_expert"]
            shared = (silu(h @ s["gate_proj"]["kernel"]) * (h @ s["up_proj"]["kernel"])) @ s["down_proj"]["kernel"]
            out[idx] += shared / (1 + np.exp(-(h @ p["shared_expert_gate"]["kernel"])))
    return out


@pytest.mark.parametrize("normalize,shared", [(True, 0), (False, 5)])  # mixtral / qwen3_moe, qwen2_moe
def test_moe_dense_and_grouped_paths_match_the_definition(normalize, shared):
    moe = dataclasses.replace(MOE_BASE.moe, normalize_top_k=normalize, shared_expert_size=shared)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    params = core.MoeMlp(dataclasses.replace(MOE_BASE, moe=moe)).init(jax.random.PRNGKey(0), x)["params"]
    expected = _moe_reference(params, np.asarray(x), moe)
    for impl in ("dense", "grouped"):
        cfg = dataclasses.replace(MOE_BASE, moe=dataclasses.replace(moe, impl=impl))
        got = jax.jit(core.MoeMlp(cfg).apply)({"params": params}, x)
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0, err_msg=impl)


def test_moe_config_is_checked():
    with pytest.raises(LinalignError, match="top_k <= num_experts"):
        core.MoeConfig(num_experts=2, top_k=3, expert_size=4)
    with pytest.raises(LinalignError, match="unsupported MoE impl 'sparse'"):
        core.MoeConfig(num_experts=2, top_k=1, expert_size=4, impl="sparse")


def test_experts_are_sharded_over_the_model_axis():
    from linalign_jax import distributed

    params = jax.eval_shape(functools.partial(core.init_params, MOE_BASE), jax.random.PRNGKey(0))
    specs = distributed.partition_specs(params, distributed.local_mesh())
    for name in ("gate", "up", "down"):  # [L, E, in, out]: whole experts per device
        assert specs["layers"]["mlp"][f"experts_{name}_proj"] == P(None, "model", None, None)
