"""BERT, MPNet, XLM-RoBERTa and ModernBERT against PyTorch transformers (tiny random models) and sentence-transformers (the real checkpoints).

Fixtures come from tests/fixtures/encoder_fixtures.py (torch venv); see its docstring for what each file holds.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from linalign_jax.errors import LinalignError
from linalign_jax.features import extract_features
from linalign_jax.models import checkpoint, load_model, mpnet

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "encoders"
TINY = {"bert": FIXTURES / "bert_tiny", "mpnet": FIXTURES / "mpnet_tiny",
        "xlm-roberta": FIXTURES / "xlm_roberta_tiny", "modernbert": FIXTURES / "modernbert_tiny"}
REAL = ("all-MiniLM-L6-v2", "all-mpnet-base-v2")
TOLERANCE = 1e-5  # README's parity claim


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    return load_model(str(TINY[request.param])), np.load(TINY[request.param] / "expected.npz")


def real_token_error(got, want, mask) -> float:
    """Max |got - want| over real tokens (HF's states at padded slots are arbitrary)."""
    return float(np.abs((np.asarray(got, np.float32) - want) * (mask[..., None] > 0)).max())


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attention", ["auto", "fused"])  # auto is the explicit path on a CPU
def test_tiny_models_match_transformers(tiny, side, attention):
    model, expected = tiny
    mask = expected[f"{side}_attention_mask"]
    module = type(model.module)(dataclasses.replace(model.config, attention=attention))
    out = module.apply({"params": model.params}, expected[f"{side}_input_ids"].astype(np.int32),
                       mask.astype(np.int32), True)
    assert model.family in TINY and not model.is_decoder
    assert real_token_error(out.last_hidden_state, expected[f"{side}_last_hidden_state"], mask) <= TOLERANCE
    want_layers = expected[f"{side}_hidden_states"]
    assert len(out.hidden_states) == len(want_layers) == model.config.num_hidden_layers + 1
    # The last entry is the final state; pre-LN families (ModernBERT) apply their final norm to it, as
    # last_hidden_state (checked above), while ours holds the last layer's output before it, as decoders do.
    for got, want in zip(out.hidden_states[:-1], want_layers[:-1]):
        assert real_token_error(got, want, mask) <= TOLERANCE


def test_padding_side_and_filler_rows_do_not_change_real_tokens(tiny):
    model, expected = tiny
    right = expected["right_attention_mask"].astype(np.int32)
    left = expected["left_attention_mask"].astype(np.int32)
    ids_r, ids_l = expected["right_input_ids"].astype(np.int32), expected["left_input_ids"].astype(np.int32)
    # A filler row with no real token, as extraction adds to fill a batch, must not produce NaN or disturb others.
    ids_r = np.concatenate([ids_r, np.full_like(ids_r[:1], model.pad_token_id)])
    right = np.concatenate([right, np.zeros_like(right[:1])])
    out_r = np.asarray(model.forward(model.params, ids_r, right).last_hidden_state)
    out_l = np.asarray(model.forward(model.params, ids_l, left).last_hidden_state)
    assert np.isfinite(out_r).all()
    for b in range(left.shape[0]):
        assert np.abs(out_r[b][right[b] > 0] - out_l[b][left[b] > 0]).max() <= 1e-5


def test_mpnet_relative_buckets_match_transformers():
    relative = np.arange(-700, 701)  # the span encoder_fixtures.py wrote
    np.testing.assert_array_equal(mpnet.relative_position_bucket(relative, 32), np.load(FIXTURES / "mpnet_buckets.npy"))


@pytest.mark.parametrize("name", REAL)
def test_real_models_match_sentence_transformers(name):
    """Mean-pooled, normalized embeddings of the real checkpoints: cosine >= 0.999999 with sentence-transformers."""
    meta = json.loads((FIXTURES / "real" / "sentences.json").read_text())
    reference = np.load(FIXTURES / "real" / f"{name}.npy")
    model = load_model(name)
    features = extract_features(model, meta["sentences"], pooling="mean", normalize=True,
                                max_length=meta["models"][name]["max_seq_length"], batch_size=4, progress=False)
    cosine = np.sum(features.array * reference, axis=-1)
    assert features.array.shape == reference.shape and features.metadata["truncated"] == 0
    assert cosine.min() >= 0.999999, cosine


def test_task_checkpoint_prefix_and_bfloat16(tmp_path):
    """A BertForX checkpoint ("bert."-prefixed names, an extra head) loads; bfloat16 stays close to float32."""
    model_dir = tmp_path / "bert_prefixed"
    shutil.copytree(TINY["bert"], model_dir)
    tensors = {f"bert.{k}": np.array(v) for k, v in checkpoint.read_checkpoint(TINY["bert"]).items()}
    tensors["cls.predictions.bias"] = np.zeros(3, np.float32)
    checkpoint.write_safetensors(model_dir / "model.safetensors", tensors)
    expected = np.load(TINY["bert"] / "expected.npz")
    ids, mask = expected["right_input_ids"].astype(np.int32), expected["right_attention_mask"].astype(np.int32)
    for dtype, tolerance in (("float32", TOLERANCE), ("bfloat16", 0.1)):
        model = load_model(str(model_dir), dtype=dtype)
        out = model.forward(model.params, ids, mask).last_hidden_state
        assert str(out.dtype) == dtype
        assert real_token_error(out, expected["right_last_hidden_state"], mask) <= tolerance


def copy_with(tmp_path, family: str, tensors=None, config_changes=None) -> Path:
    model_dir = tmp_path / family
    shutil.copytree(TINY[family], model_dir)
    if tensors is not None:
        checkpoint.write_safetensors(model_dir / "model.safetensors", tensors)
    if config_changes:
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, **config_changes}))
    return model_dir


def test_missing_tensor_is_an_error(tmp_path):
    tensors = dict(checkpoint.read_checkpoint(TINY["mpnet"]))
    del tensors["encoder.relative_attention_bias.weight"]
    with pytest.raises(LinalignError, match="relative_attention_bias"):
        load_model(str(copy_with(tmp_path, "mpnet", tensors=tensors)))


def test_wrong_architecture_is_an_error(tmp_path):
    """MPNet weights under a BERT config: the table finds neither BERT's names nor a use for MPNet's."""
    tensors = checkpoint.read_checkpoint(TINY["mpnet"])
    with pytest.raises(LinalignError, match="lacks"):
        load_model(str(copy_with(tmp_path, "bert", tensors=dict(tensors))))


def test_shape_mismatch_is_an_error(tmp_path):
    with pytest.raises(LinalignError, match="shapes do not match"):
        load_model(str(copy_with(tmp_path, "bert", config_changes={"intermediate_size": 40})))


def test_truncated_weights_are_an_error(tmp_path):
    model_dir = copy_with(tmp_path, "bert")
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(LinalignError, match="truncated"):
        load_model(str(model_dir))


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "swish"}, "hidden_act"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
])
def test_unsupported_configs_are_errors(tmp_path, changes, message):
    with pytest.raises(LinalignError, match=message):
        load_model(str(copy_with(tmp_path, "bert", config_changes=changes)))


@pytest.mark.parametrize("family, positions", [("bert", 64), ("mpnet", 64)])  # max_position_embeddings 64 / 66
def test_sequences_beyond_the_position_table_are_errors(family, positions):
    model = load_model(str(TINY[family]))
    ok = np.ones((1, positions), np.int32) * 5
    assert model.forward(model.params, ok, np.ones_like(ok)).last_hidden_state.shape == (1, positions, 32)
    too_long = np.ones((1, positions + 1), np.int32) * 5
    with pytest.raises(LinalignError, match=f"exceeds the {positions} positions"):
        model.forward(model.params, too_long, np.ones_like(too_long))


def test_unsupported_dtype_is_an_error():
    with pytest.raises(LinalignError, match="float16"):
        load_model(str(TINY["bert"]), dtype="float16")
