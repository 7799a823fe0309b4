"""Feature extraction and the feature cache, on the tiny BERT fixture (real tokenizer, random weights)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from linalign_jax import features, shapes
from linalign_jax.errors import LinalignError
from linalign_jax.models import load_model

TINY_BERT = Path(__file__).resolve().parent / "fixtures" / "encoders" / "bert_tiny"
TEXTS = [
    "What is the capital city?",
    "a good movie",
    "The man was playing music on the guitar in the city, and it was great.",
    "bad",
    "Why?",
    "how the stock market is a question of answer and play",
    "it",
]


@pytest.fixture(scope="module")
def model():
    return load_model(str(TINY_BERT))


@pytest.fixture(scope="module")
def unpadded(model):
    """Per text, its states run alone, unpadded: what every pooling is checked against."""
    runs = {}
    for text in TEXTS:
        ids = np.asarray([model.tokenizer.encode(text).ids], np.int32)
        out = model.forward(model.params, ids, np.ones_like(ids), output_hidden_states=True)
        runs[text] = [np.asarray(h)[0] for h in out.hidden_states] + [np.asarray(out.last_hidden_state)[0]]
    return runs  # index -1: final states; 0..L: hidden_states


# ------------------------------------------------------------------------------------------------------ pooling

@pytest.mark.parametrize("side", ["right", "left"])
def test_pool_uses_real_tokens_only(side):
    hidden = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    lengths = (3, 1)
    mask = np.zeros((2, 4), np.int32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        if side == "left":
            mask[b] = mask[b][::-1]
    real = [hidden[b][mask[b] > 0] for b in range(2)]
    np.testing.assert_allclose(features.pool(hidden, mask, "mean"), [r.mean(0) for r in real], rtol=1e-6)
    np.testing.assert_array_equal(features.pool(hidden, mask, "last"), [r[-1] for r in real])
    np.testing.assert_array_equal(features.pool(hidden, mask, "cls"), [r[0] for r in real])


def test_pool_of_a_filler_row_is_finite():
    hidden, mask = jnp.ones((1, 4, 3)), jnp.zeros((1, 4), jnp.int32)
    for pooling in ("mean", "last", "cls"):
        assert np.isfinite(np.asarray(features.pool(hidden, mask, pooling))).all()


@pytest.mark.parametrize("length, bucket", [(1, 16), (16, 16), (17, 32), (100, 128), (129, 200), (500, 200)])
def test_length_buckets_are_powers_of_two_capped(length, bucket):
    assert shapes.bucket(length, shapes.MIN_SEQUENCE, maximum=200) == bucket


# --------------------------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_pooled_features_match_unpadded_runs(model, unpadded, pooling):
    got = features.extract_features(model, TEXTS, pooling=pooling, batch_size=3, progress=False)
    want = []
    for text in TEXTS:
        states = unpadded[text][-1]
        want.append({"mean": states.mean(0), "last": states[-1], "cls": states[0]}[pooling])
    assert got.array.dtype == np.float32 and got.array.shape == (len(TEXTS), model.hidden_size)
    np.testing.assert_allclose(got.array, np.stack(want), atol=1e-5)
    meta = got.metadata
    assert meta["model_fingerprint"] == model.fingerprint and meta["n_texts"] == len(TEXTS)
    assert meta["truncated"] == 0 and meta["batch_rows"] == 3
    assert all(width in (16, 32) for _, width in meta["shapes"])


def test_padding_side_batch_size_and_normalize(model):
    base = features.extract_features(model, TEXTS, batch_size=2, progress=False)
    left = features.extract_features(model, TEXTS, batch_size=5, padding_side="left", progress=False)
    np.testing.assert_allclose(left.array, base.array, atol=1e-5)
    normed = features.extract_features(model, TEXTS, normalize=True, progress=False)
    np.testing.assert_allclose(normed.array, base.array / np.linalg.norm(base.array, axis=1, keepdims=True),
                               atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_layer_selects_hidden_states(model, unpadded, layer):
    got = features.extract_features(model, TEXTS, layer=layer, progress=False)
    np.testing.assert_allclose(got.array, [unpadded[t][:-1][layer].mean(0) for t in TEXTS], atol=1e-5)


def test_all_layers_in_one_pass_pooled_and_cached(model, unpadded, tmp_path):
    got = features.cached_features(model, TEXTS, "data-A", layer="all", batch_size=3, normalize=True,
                                   cache_dir=tmp_path, progress=False)
    n_states = features.num_states(model)
    assert got.array.shape == (n_states, len(TEXTS), model.hidden_size)
    for layer in range(n_states):
        want = np.asarray([unpadded[t][:-1][layer].mean(0) for t in TEXTS])
        np.testing.assert_allclose(got.array[layer], want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    again = features.cached_features(model, TEXTS, "data-A", layer="all", normalize=True, cache_dir=tmp_path,
                                     progress=False)
    assert again.metadata["cache"] == "hit" and again.array.shape == got.array.shape
    with pytest.raises(LinalignError, match="pooled states only"):
        features.extract_features(model, TEXTS, layer="all", pooling="tokens", progress=False)


def test_tokens_give_states_and_character_spans(model, unpadded):
    got = features.extract_features(model, TEXTS, pooling="tokens", batch_size=4, progress=False)
    assert isinstance(got, features.TokenFeatures)
    for text, states, ids, offsets, special in zip(TEXTS, got.states, got.token_ids, got.offsets, got.special):
        np.testing.assert_allclose(states, unpadded[text][-1], atol=1e-5)
        assert len(ids) == len(offsets) == len(special) == len(states)
        assert special[0] and special[-1] and not special[1:-1].any()  # [CLS] ... [SEP]
        pieces = [model.tokenizer.id_to_token(int(i)).removeprefix("##") for i in ids[1:-1]]
        spans = [text[s:e].lower() for s, e in offsets[1:-1]]
        assert spans == pieces


def test_truncation_is_counted_and_logged(model, caplog):
    long_text = " ".join(["music"] * 40)
    with caplog.at_level(logging.WARNING, logger="linalign_jax.features"):
        got = features.extract_features(model, [long_text, "short"], max_length=20, progress=False)
    assert got.metadata["truncated"] == 1
    assert "1 of 2 texts exceed max_length=20" in caplog.text
    tokens = features.extract_features(model, [long_text], pooling="tokens", max_length=20, progress=False)
    assert len(tokens.token_ids[0]) == 20 and tokens.special[0][-1]  # [SEP] kept at the end


def test_tokenizer_settings_are_restored(model):
    """tokenizer.json files often pad or truncate (MiniLM's pads to 128); extraction ignores and restores that."""
    tok = model.tokenizer
    tok.enable_truncation(max_length=9)
    tok.enable_padding(length=30, pad_id=0, pad_token="[PAD]")
    before = (tok.truncation, tok.padding)
    try:
        got = features.extract_features(model, TEXTS, pooling="tokens", progress=False)
        assert (tok.truncation, tok.padding) == before
    finally:
        tok.no_truncation()
        tok.no_padding()
    assert [len(ids) for ids in got.token_ids] == [len(tok.encode(t).ids) for t in TEXTS]


@pytest.mark.parametrize("kwargs, message", [
    (dict(texts=[]), "empty"),
    (dict(texts="one string"), "list of strings"),
    (dict(texts=["ok", None]), r"texts\[1\]"),
    (dict(pooling="max"), "unknown pooling 'max'"),
    (dict(layer=3), "layer 3 out of range"),
    (dict(layer=-4), "layer -4 out of range"),
    (dict(max_length=0), "max_length"),
    (dict(batch_size=0), "batch_size"),
    (dict(pooling="tokens", normalize=True), "normalize"),
    (dict(padding_side="middle"), "padding_side"),
])
def test_bad_arguments_are_errors(model, kwargs, message):
    kwargs = {"texts": TEXTS, **kwargs}
    with pytest.raises(LinalignError, match=message):
        features.extract_features(model, kwargs.pop("texts"), progress=False, **kwargs)


def test_sharded_over_four_devices_matches_one(model, tmp_path):
    """The same extraction with the rows sharded over 4 forced CPU devices (a separate process: the device count
    is fixed when JAX starts)."""
    one = features.extract_features(model, TEXTS, batch_size=3, progress=False).array
    script = (
        "import sys, numpy as np, jax\n"
        "from linalign_jax import features\nfrom linalign_jax.models import load_model\n"
        "assert jax.local_device_count() == 4\n"
        f"got = features.extract_features(load_model({str(TINY_BERT)!r}), {TEXTS!r}, batch_size=3, progress=False)\n"
        "assert got.metadata['devices'] == 4 and got.metadata['batch_rows'] == 4\n"
        "np.save(sys.argv[1], got.array)\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "four.npy"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, timeout=300,
                   cwd=Path(__file__).resolve().parents[1])
    np.testing.assert_allclose(np.load(out), one, atol=1e-5)


# -------------------------------------------------------------------------------------------------------- cache

def test_cache_miss_hit_and_key(model, tmp_path):
    first = features.cached_features(model, TEXTS, "data-A", cache_dir=tmp_path, progress=False)
    second = features.cached_features(model, TEXTS, "data-A", cache_dir=tmp_path, progress=False)
    assert first.metadata["cache"] == "miss" and second.metadata["cache"] == "hit"
    np.testing.assert_array_equal(first.array, second.array)
    meta = json.loads(Path(second.metadata["cache_path"]).with_suffix(".json").read_text())
    assert meta["shape"] == [len(TEXTS), model.hidden_size] and meta["truncated"] == 0
    assert meta["key"]["model_fingerprint"] == model.fingerprint and meta["key"]["data_fingerprint"] == "data-A"
    for changed in (dict(pooling="cls"), dict(layer=0), dict(max_length=64), dict(normalize=True)):
        other = features.cached_features(model, TEXTS, "data-A", cache_dir=tmp_path, progress=False, **changed)
        assert other.metadata["cache"] == "miss", changed
    assert features.cached_features(model, TEXTS, "data-B", cache_dir=tmp_path,
                                    progress=False).metadata["cache"] == "miss"
    assert len(list(tmp_path.glob("*.npy"))) == 6


@pytest.mark.parametrize("damage", ["truncate", "flip", "bad_json", "missing_array"])
def test_corrupt_cache_entry_is_recomputed(model, tmp_path, caplog, damage):
    first = features.cached_features(model, TEXTS, "data-A", cache_dir=tmp_path, progress=False)
    array_path = Path(first.metadata["cache_path"])
    meta_path = array_path.with_suffix(".json")
    if damage == "truncate":
        array_path.write_bytes(array_path.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(array_path.read_bytes())
        data[-1] ^= 0xFF
        array_path.write_bytes(bytes(data))
    elif damage == "bad_json":
        meta_path.write_text("{not json")
    else:
        array_path.unlink()
    with caplog.at_level(logging.WARNING, logger="linalign_jax.features"):
        again = features.cached_features(model, TEXTS, "data-A", cache_dir=tmp_path, progress=False)
    assert again.metadata["cache"] == "miss" and "corrupt feature cache entry" in caplog.text
    np.testing.assert_array_equal(again.array, first.array)
    assert features.cached_features(model, TEXTS, "data-A", cache_dir=tmp_path,
                                    progress=False).metadata["cache"] == "hit"


def test_cache_rejects_a_fingerprint_that_does_not_fit_the_texts(model, tmp_path):
    features.cached_features(model, TEXTS, "data-A", cache_dir=tmp_path, progress=False)
    with pytest.raises(LinalignError, match="does not identify them"):
        features.cached_features(model, TEXTS[:2], "data-A", cache_dir=tmp_path, progress=False)
    with pytest.raises(LinalignError, match="tokens"):
        features.cached_features(model, TEXTS, "data-A", pooling="tokens", cache_dir=tmp_path, progress=False)


def test_cache_accepts_a_dataset(model, tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": TEXTS, "label": list(range(len(TEXTS)))})
    got = features.cached_features(model, dataset, "data-ds", cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(got.array, features.extract_features(model, TEXTS, progress=False).array, atol=1e-6)


# ------------------------------------------------------------------------- embedding-model conventions

CONVENTIONS_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "embedders" / "qwen3_st"


@pytest.fixture(scope="module")
def st_model():
    from linalign_jax.models import load_model

    meta = json.loads((CONVENTIONS_FIXTURE / "sentences.json").read_text())
    return load_model(str(CONVENTIONS_FIXTURE)), meta, np.load(CONVENTIONS_FIXTURE / "expected.npz")


def _extract(model, texts, options, **extra):
    kwargs = {k: v for k, v in options.cache_kwargs(model).items() if k != "cache_dir"}
    return features.extract_features(model, texts, progress=False, **kwargs, **extra).array


def test_sentence_transformers_metadata_is_read_and_matches_sentence_transformers(st_model):
    """Unset options take the directory's lasttoken pooling, Normalize, max_seq_length and default prompt."""
    from linalign_jax.features import ExtractOptions

    model, meta, expected = st_model
    resolved = ExtractOptions().cache_kwargs(model)
    assert (resolved["pooling"], resolved["normalize"], resolved["max_length"]) == ("last", True, 48)
    assert ExtractOptions(pooling="mean", normalize=False).cache_kwargs(model)["pooling"] == "mean"  # flags win
    assert ExtractOptions().cache_kwargs(None)["pooling"] == "mean"  # no model metadata: the project default
    got = _extract(model, meta["sentences"], ExtractOptions(batch_size=4))
    np.testing.assert_allclose(got, expected["default"], atol=2e-5, rtol=0)


def test_documented_instruction_format_and_eos_match_sentence_transformers(st_model, tmp_path):
    """Qwen3-Embedding's documented format with a task; EOS appended by us when the tokenizer does not (a copy with
    the post-processor removed) and not doubled when it does."""
    import dataclasses
    import shutil

    from linalign_jax.features import ExtractOptions, prompt_key
    from linalign_jax.models import conventions, load_model

    model, meta, expected = st_model
    plain_dir = tmp_path / "plain"
    shutil.copytree(CONVENTIONS_FIXTURE, plain_dir)
    tokenizer = json.loads((plain_dir / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (plain_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    options = ExtractOptions(batch_size=4, instruction=meta["task"])
    for directory, base in ((CONVENTIONS_FIXTURE, model), (plain_dir, load_model(str(plain_dir)))):
        documented = conventions.conventions_for("Qwen/Qwen3-Embedding-8B", directory, base.tokenizer)
        qwen = dataclasses.replace(base, conventions=documented)
        np.testing.assert_allclose(_extract(qwen, meta["sentences"], options), expected["task"], atol=2e-5, rtol=0)
    key = prompt_key(qwen, meta["task"])
    assert key == {"prompt": f"Instruct: {meta['task']}\nQuery:{{text}}", "append_eos": 0}
    assert prompt_key(qwen, "") == {"append_eos": 0} and prompt_key(qwen, "other") != key
