"""GGUF loading: the two offline models against transformers' GGUF-dequantised models (tests/fixtures/real, written by
make_fixtures.py), plus the GGUF conversions and error paths on small synthetic files.

The real models are loaded through `load_model` from their asset names (the Makefile fetches the assets first); the
first load in a cache materialises float32 safetensors, later ones read them.
"""
import json
from pathlib import Path

import gguf as gguf_lib
import jax.numpy as jnp
import numpy as np
import pytest

from linalign_jax.errors import LinalignError
from linalign_jax.models import gguf, load_model

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real"
MODELS = ["SmolLM2-135M-Instruct", "gemma-3-270m"]
REL_TOL = 1e-5  # README's parity claim


def relative_error(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=MODELS)
def real(request):
    name = request.param
    return (name, load_model(name), dict(np.load(REAL / f"{name}.npz")),
            json.loads((REAL / f"{name}.json").read_text()))


def test_hidden_states_and_logits_match_transformers(real):
    name, model, ref, meta = real
    assert len(meta["prompts"]) >= 4
    for i, _ in enumerate(meta["prompts"]):
        ids = jnp.asarray(ref[f"p{i}_input_ids"])[None]
        hidden = model.forward(model.params, ids, jnp.ones_like(ids), False).last_hidden_state[0]
        logits = np.asarray(model.lm_head(model.params, hidden[-1]), np.float64)
        assert relative_error(hidden[-4:], ref[f"p{i}_hidden_last4"]) <= REL_TOL, (name, i)
        assert relative_error(logits[ref[f"p{i}_top_ids"]], ref[f"p{i}_top_logits"]) <= REL_TOL, (name, i)
        assert relative_error(logits[ref["vocab_sample_ids"]], ref[f"p{i}_sample_logits"]) <= REL_TOL, (name, i)
        logsumexp = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        assert abs(logsumexp - ref[f"p{i}_logsumexp"]) <= REL_TOL * abs(ref[f"p{i}_logsumexp"]), (name, i)
        assert logits.argmax() == ref[f"p{i}_top_ids"][0], (name, i)


def test_config_matches_transformers(real):
    name, model, _, meta = real
    hf, cfg = meta["config"], model.config
    hf = hf.get("text_config", hf)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (hf["vocab_size"], hf["hidden_size"],
                                                                  hf["num_hidden_layers"])
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (
        hf["num_attention_heads"], hf["num_key_value_heads"], hf["intermediate_size"])
    assert cfg.tie_embeddings == hf.get("tie_word_embeddings", True)
    if cfg.family == "gemma3":
        assert cfg.sliding_window == hf["sliding_window"]
        assert list(cfg.layer_types) == hf["layer_types"]
        assert cfg.scale == pytest.approx(hf["query_pre_attn_scalar"] ** -0.5)
        assert cfg.local_rope.theta == hf["rope_parameters"]["sliding_attention"]["rope_theta"]
        assert cfg.rope.theta == hf["rope_parameters"]["full_attention"]["rope_theta"]
    else:
        assert cfg.rope.theta == hf["rope_parameters"]["rope_theta"]


def test_tokenizer_matches_transformers(real):
    """Ids and character offsets equal transformers 5's GGUF tokenizer on prose, code, whitespace, scripts, emoji and
    special tokens."""
    name, model, _, _ = real
    checks = json.loads((REAL / f"{name}.tokenizer.json").read_text())
    for check in checks:
        enc = model.tokenizer.encode(check["text"])
        assert enc.ids == check["ids"], check["text"]
        assert [list(o) for o in enc.offsets] == check["offsets"], check["text"]


def test_greedy_continuation_with_kv_cache(real):
    """All prompts in one left-padded batch: prefill, then 16 cached steps reproduce transformers' greedy tokens."""
    name, model, ref, meta = real
    prompts = [ref[f"p{i}_input_ids"] for i in range(len(meta["prompts"]))]
    steps = len(ref["p0_greedy_ids"])
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), model.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    cache = model.init_cache(len(prompts), width + steps)
    out, cache = model.extend(model.params, jnp.asarray(ids), jnp.asarray(mask), cache)
    generated = []
    for _ in range(steps):
        token = jnp.argmax(model.lm_head(model.params, out.last_hidden_state[:, -1]), axis=-1).astype(jnp.int32)
        generated.append(np.asarray(token))
        out, cache = model.extend(model.params, token[:, None], jnp.ones_like(token)[:, None], cache)
    generated = np.stack(generated, axis=1)
    for b in range(len(prompts)):
        np.testing.assert_array_equal(generated[b], ref[f"p{b}_greedy_ids"], err_msg=f"{name} prompt {b}")


def test_materialised_cache_is_reused(real):
    name, model, _, meta = real
    from linalign_jax.assets import resolve_model

    target = gguf.materialize(resolve_model(name))  # built by the fixture's load_model
    weights = target / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert gguf.materialize(resolve_model(name)) == target and weights.stat().st_mtime_ns == before
    assert gguf.source_of(target)[1] == meta["gguf_sha256"]  # keyed by the GGUF the references came from


# ---------------------------------------------------------------------------------------- synthetic GGUF files

def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the inverse of gguf.unpermute_qk)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    np.testing.assert_array_equal(gguf.unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def write_gguf(path: Path, arch: str, tensors: dict, raw_types: dict = ()) -> Path:
    """A minimal one-layer GGUF file (metadata + the given tensors), enough to reach each error path."""
    writer = gguf_lib.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_context_length(32)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(ord("a") + i) for i in range(16)])
    for name, array in tensors.items():
        raw = dict(raw_types).get(name)
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("LINALIGN_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", "mamba", {"token_embd.weight": np.zeros((16, 8), np.float32)})
    with pytest.raises(LinalignError, match="'mamba'.*supported: llama, qwen2, qwen3, gemma3"):
        gguf.materialize(path)


def test_quantisation_gguf_cannot_dequantise(tmp_path, monkeypatch):
    monkeypatch.setenv("LINALIGN_CACHE", str(tmp_path / "cache"))
    q8_1 = gguf_lib.GGMLQuantizationType.Q8_1  # gguf 0.19 has no dequantiser for it
    _, type_size = gguf_lib.GGML_QUANT_SIZES[q8_1]
    path = write_gguf(tmp_path / "q.gguf", "llama", {"token_embd.weight": np.zeros((16, type_size), np.uint8)},
                      raw_types={"token_embd.weight": q8_1})
    with pytest.raises(LinalignError, match="token_embd.weight.*Q8_1.*cannot dequantise"):
        gguf.materialize(path)


def test_truncated_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("LINALIGN_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": np.ones((16, 8), np.float32)})
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(LinalignError, match="truncated"):
        gguf.materialize(path)
