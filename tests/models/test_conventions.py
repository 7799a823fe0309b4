"""Embedding-model conventions: read from sentence-transformers files and the documented instruction formats.

The end-to-end check against sentence-transformers (tiny Qwen3 with prompts, tests/fixtures/embedding_fixtures.py)
is in tests/test_features.py's conventions tests.
"""
import json
import shutil
from pathlib import Path

import pytest

from linalign_jax.errors import LinalignError
from linalign_jax.models import conventions

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "embedders" / "qwen3_st"


def test_sentence_transformers_directory():
    c = conventions.read_sentence_transformers(FIXTURE)
    assert (c.pooling, c.normalize, c.max_length, c.padding_side) == ("last", True, 48, "left")
    assert c.prompt == "question: {text}" and c.format("a b") == "question: a b"
    assert c.format("a b", instruction="") == "a b"
    assert conventions.read_sentence_transformers(FIXTURE.parent) == conventions.EmbeddingConventions()


def test_legacy_files(tmp_path):
    """sentence-transformers < 6: pooling_mode_* booleans, max_seq_length in sentence_bert_config.json."""
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    c = conventions.read_sentence_transformers(tmp_path)
    assert (c.pooling, c.normalize, c.max_length, c.prompt) == ("cls", None, 256, None)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(LinalignError, match="pooling .*max.* is not supported"):
        conventions.read_sentence_transformers(tmp_path)


def test_documented_instruction_models():
    e5 = conventions.DOCUMENTED["intfloat/e5-mistral-7b-instruct"]
    assert e5.format("hi", "Classify it") == "Instruct: Classify it\nQuery: hi"
    assert e5.format("hi").startswith("Instruct: Given a web search query") and e5.append_eos
    qwen = conventions.DOCUMENTED["Qwen/Qwen3-Embedding-8B"]
    assert qwen.format("hi", "T") == "Instruct: T\nQuery:hi"
    assert (qwen.pooling, qwen.normalize, qwen.padding_side, qwen.append_eos) == ("last", True, "left", True)
    hub_path = "/x/hub/models--intfloat--e5-mistral-7b-instruct/snapshots/0123"
    assert conventions.hub_id_of(hub_path) == conventions.hub_id_of("intfloat/e5-mistral-7b-instruct@rev")
    assert conventions.hub_id_of("all-MiniLM-L6-v2") is None


def test_documented_format_over_the_directory_and_eos_id(tmp_path):
    c = conventions.conventions_for("Qwen/Qwen3-Embedding-8B", FIXTURE)
    assert c.prompt == "Instruct: {task}\nQuery:{text}" and c.max_length == 48 and c.append_eos
    assert c.eos_token_id == 0  # config.json's eos_token_id (no tokenizer given)
    plain = tmp_path / "plain"
    shutil.copytree(FIXTURE, plain)
    (plain / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (plain / "tokenizer_config.json").unlink()
    with pytest.raises(LinalignError, match="appends an EOS token"):
        conventions.conventions_for("Qwen/Qwen3-Embedding-8B", plain)


def test_instruction_for_a_model_without_a_format_is_an_error():
    with pytest.raises(LinalignError, match="documents no instruction format"):
        conventions.EmbeddingConventions().format("x", instruction="Classify")
    with pytest.raises(LinalignError, match="takes no task"):
        conventions.read_sentence_transformers(FIXTURE).format("x", instruction="Classify")
