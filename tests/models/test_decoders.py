"""Decoder families against PyTorch transformers: tiny random models written by tests/fixtures/make_fixtures.py.

Every case holds the same sequences right- and left-padded; our position ids follow the mask, HF was given the same
position ids, so both paddings must match HF on the real tokens (max abs error <= 1e-5, float32; README quotes it).
Cases under fixtures/families/ commit no weights: their checkpoints are rebuilt from synthetic_weights.py under the
names transformers saved, in the causal-LM layout and in the base-model layout (AutoModel: no `model.`, no head).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linalign_jax.errors import LinalignError
from linalign_jax.models import checkpoint, load_model, supported_model_types
from tests.fixtures.synthetic_weights import synthetic_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "decoders"
FAMILIES = FIXTURES.parent / "families"
COMMITTED = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.npz").exists())
SYNTHETIC = sorted(p.name for p in FAMILIES.iterdir() if (p / "layouts.json").exists())
CASES = COMMITTED + SYNTHETIC
TOL = 1e-5  # README's parity claim


def _case_dir(name: str) -> Path:
    return FIXTURES / name if name in COMMITTED else FAMILIES / name


def materialize(name: str, layout: str, root: Path) -> Path:
    """An HF directory for a families/ case: config, tokenizer and the synthetic weights in `layout`."""
    spec = json.loads((FAMILIES / name / "layouts.json").read_text())
    out = root / f"{name}-{layout}"
    out.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (out / f).write_bytes((FAMILIES / name / f).read_bytes())
    if layout == "causal":
        tensors = synthetic_checkpoint(name, spec["causal"])
    else:
        tensors = synthetic_checkpoint(name, {n: s for n, (s, _) in spec["base"].items()},
                                       {n: src for n, (_, src) in spec["base"].items()})
    checkpoint.write_safetensors(out / "model.safetensors", tensors)
    return out


def test_every_family_has_a_case():
    families = {json.loads((_case_dir(c) / "config.json").read_text())["model_type"] for c in CASES}
    assert families >= {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "olmo2", "olmo3", "apertus",
                        "qwen3_moe", "qwen2_moe", "mixtral", "gemma", "gemma2", "phi3", "mistral3"}


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    name = request.param
    path = FIXTURES / name if name in COMMITTED else materialize(name, "causal", tmp_path_factory.mktemp("causal"))
    return name, load_model(str(path)), dict(np.load(_case_dir(name) / "expected.npz"))


def base_layout_names(causal_names, prefix="model."):
    """{base name: causal name} as AutoModel saves a text decoder: the prefix dropped, no lm_head."""
    return {n[len(prefix):]: n for n in causal_names if n.startswith(prefix)}


def test_base_layout_rule_is_what_transformers_saves():
    """The rule the committed cases' base checkpoints are built with, checked on every families/ case transformers
    saved both ways (the multimodal one keeps its own layout)."""
    checked = 0
    for name in SYNTHETIC:
        spec = json.loads((FAMILIES / name / "layouts.json").read_text())
        if "text_config" not in json.loads((FAMILIES / name / "config.json").read_text()):
            assert set(base_layout_names(spec["causal"])) == set(spec["base"]), name
            checked += 1
    assert checked >= 9


def _base_checkpoint(name: str, root: Path) -> Path:
    if name in SYNTHETIC:
        return materialize(name, "base", root)
    out = root / name
    out.mkdir()
    for f in (FIXTURES / name).iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = checkpoint.read_safetensors(FIXTURES / name / "model.safetensors")
    prefix = "transformer." if "wte.weight" in tensors or "transformer.wte.weight" in tensors else "model."
    names = base_layout_names(tensors, prefix) if any(n.startswith(prefix) for n in tensors) else {n: n for n in tensors}
    checkpoint.write_safetensors(out / "model.safetensors", {n: np.asarray(tensors[src]) for n, src in names.items()})
    return out


@pytest.mark.parametrize("name", CASES)
def test_base_model_layout_matches_transformers(name, tmp_path):
    """The AutoModel checkpoint (no `model.` prefix, no lm_head) gives the same states; logits only when tied."""
    model = load_model(str(_base_checkpoint(name, tmp_path)))
    expected = np.load(_case_dir(name) / "expected.npz")
    ids = jnp.asarray(expected["left_input_ids"], jnp.int32)
    mask = jnp.asarray(expected["left_attention_mask"], jnp.int32)
    hidden = model.forward(model.params, ids, mask).last_hidden_state
    real = expected["left_attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], expected["left_last_hidden_state"][real], atol=TOL, rtol=0)
    if model.config.tie_embeddings:
        logits = np.asarray(model.lm_head(model.params, hidden))
        np.testing.assert_allclose(logits[real], expected["left_logits"][real], atol=TOL, rtol=0)
    else:
        with pytest.raises(LinalignError, match="base model.*no logits"):
            model.lm_head(model.params, hidden)


@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_transformers(case, side):
    name, model, expected = case
    ids = jnp.asarray(expected[f"{side}_input_ids"], jnp.int32)
    mask = jnp.asarray(expected[f"{side}_attention_mask"], jnp.int32)
    out = model.forward(model.params, ids, mask, True)
    real = expected[f"{side}_attention_mask"].astype(bool)
    hidden = np.asarray(out.last_hidden_state)
    logits = np.asarray(model.lm_head(model.params, out.last_hidden_state))
    layers = np.stack([np.asarray(h) for h in out.hidden_states[:-1]])  # embeddings + all but the last layer
    assert len(out.hidden_states) == model.config.num_layers + 1
    np.testing.assert_allclose(hidden[real], expected[f"{side}_last_hidden_state"][real], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits[real], expected[f"{side}_logits"][real], atol=TOL, rtol=0)
    np.testing.assert_allclose(layers[:, real], expected[f"{side}_hidden_states"][:, real], atol=TOL, rtol=0)


LONGROPE_SKIP = ("longrope switches every position to its long factors once the sequence passes the pre-training "
                 "length, so a cache prefilled with the short ones differs from the full pass (as in transformers)")


def cache_is_exact(model, length: int) -> bool:
    rope = model.config.rope
    return not (rope.kind == "longrope" and length > rope.original_max_position_embeddings)


def incremental_logits(model, ids, mask, prefill: int = 5):
    """Prefill `prefill` tokens, then one token per `extend` step -> (logits of every position, final cache)."""
    cache = model.init_cache(ids.shape[0], ids.shape[1] + 3)
    out, cache = model.extend(model.params, ids[:, :prefill], mask[:, :prefill], cache)
    steps = [out.last_hidden_state]
    for t in range(prefill, ids.shape[1]):
        out, cache = model.extend(model.params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(out.last_hidden_state)
    return np.asarray(model.lm_head(model.params, jnp.concatenate(steps, axis=1))), cache


def test_incremental_decoding_matches_full_forward(case):
    """Prefill 5 tokens, then extend one token at a time: every step's logits equal the full pass (left padding)."""
    name, model, expected = case
    ids = jnp.asarray(expected["left_input_ids"], jnp.int32)
    mask = jnp.asarray(expected["left_attention_mask"], jnp.int32)
    if not cache_is_exact(model, ids.shape[1]):
        pytest.skip(LONGROPE_SKIP)
    full = np.asarray(model.lm_head(model.params, model.forward(model.params, ids, mask, True).last_hidden_state))
    incremental, cache = incremental_logits(model, ids, mask)
    real = expected["left_attention_mask"].astype(bool)
    np.testing.assert_allclose(incremental[real], full[real], atol=TOL, rtol=0)
    assert int(cache.length) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.positions)[:, :ids.shape[1]],
                                  np.where(real, np.cumsum(real, axis=1) - 1, -1))


@pytest.mark.parametrize("name", ["llama_gqa", "gemma3_sliding", "gpt2"])  # the dtype path is shared by all
def test_bfloat16_tracks_float32(name):
    model = load_model(str(FIXTURES / name))
    expected = np.load(FIXTURES / name / "expected.npz")
    model16 = load_model(str(FIXTURES / name), dtype="bfloat16")
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(model16.params))
    ids = jnp.asarray(expected["right_input_ids"], jnp.int32)
    mask = jnp.asarray(expected["right_attention_mask"], jnp.int32)
    hidden = np.asarray(model16.forward(model16.params, ids, mask).last_hidden_state, np.float32)
    real = expected["right_attention_mask"].astype(bool)
    ref = expected["right_last_hidden_state"][real]
    assert np.abs(hidden[real] - ref).max() <= 0.05 * np.abs(ref).max()
    assert model16.fingerprint != model.fingerprint  # same weights, other numerics: features must not be shared


def test_fingerprint_identifies_weights_and_config(tmp_path):
    model = load_model(str(FIXTURES / "llama_gqa"))
    assert load_model(str(FIXTURES / "llama_gqa")).fingerprint == model.fingerprint
    assert load_model(str(FIXTURES / "llama_yarn_rope")).fingerprint != model.fingerprint
    config = _copy_case(tmp_path, "llama_gqa") / "config.json"
    assert load_model(str(tmp_path)).fingerprint == model.fingerprint  # where the files live does not matter
    config.write_text(json.dumps({**json.loads(config.read_text()), "rms_norm_eps": 1e-3}))
    assert load_model(str(tmp_path)).fingerprint != model.fingerprint


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(LinalignError, match="mamba.*supported: .*gemma3_text.*llama.*qwen3"):
        load_model(str(tmp_path))
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"} <= set(supported_model_types())


def test_unsupported_dtype():
    with pytest.raises(LinalignError, match="float16"):
        load_model(str(FIXTURES / CASES[0]), dtype="float16")


def _copy_case(tmp_path, name):
    for f in (FIXTURES / name).iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_missing_weights(tmp_path):
    (_copy_case(tmp_path, "llama_gqa") / "model.safetensors").unlink()
    with pytest.raises(LinalignError, match="no model.safetensors"):
        load_model(str(tmp_path))


def test_truncated_weights(tmp_path):
    path = _copy_case(tmp_path, "llama_gqa") / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LinalignError, match="truncated"):
        load_model(str(tmp_path))


def test_config_that_does_not_match_the_weights(tmp_path):
    config = _copy_case(tmp_path, "llama_gqa") / "config.json"
    hf = json.loads(config.read_text())
    config.write_text(json.dumps({**hf, "intermediate_size": hf["intermediate_size"] * 2}))
    with pytest.raises(LinalignError, match="shapes do not match"):
        load_model(str(tmp_path))


def test_wrong_family_for_checkpoint(tmp_path):
    config = _copy_case(tmp_path, "qwen2_bias") / "config.json"  # qwen2 weights (with q/k/v biases) read as llama
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "llama"}))
    with pytest.raises(LinalignError, match="no rule maps.*bias"):
        load_model(str(tmp_path))


def test_experts_sharded_over_the_model_axis_match_transformers():
    """4 CPU devices in a subprocess; qwen3_moe's 4 experts one per device (distributed.TRANSFORMER_RULES)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("sharded_moe_worker.py"))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["expert_shard"] == [2, 1, 16, 8]  # [L, E/4, d, f]
    assert result["error"] <= TOL
