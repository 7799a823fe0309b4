"""The paper's models build from their config.json (Table 10, Table 3's single-model baselines and the two open
embedding models of Tables 1-2): family, width, depth and parameter count, abstractly (`jax.eval_shape`, no weights),
so a user with the weights knows the loader reads them. Where each config comes from, and the model card's parameter
count it was checked against, is in fixtures/configs/provenance.json.
"""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from linalign_jax.errors import LinalignError
from linalign_jax.models import abstract_decoder

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
PROVENANCE = json.loads((CONFIGS / "provenance.json").read_text())
PAPER_MODELS = {  # paper.md §4.2 (Table 10), Table 3's single models, and the embedding models of Tables 1-2
    "allenai/Olmo-3-7B-Instruct", "google/gemma-3-12b-it", "google/gemma-3-270m-it", "google/gemma-3-27b-it",
    "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "mistralai/Ministral-3-14B-Instruct-2512",
    "mistralai/Mistral-7B-Instruct-v0.2", "mistralai/Mistral-Nemo-Instruct-2407", "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3-4B-Instruct-2507", "swiss-ai/Apertus-8B-Instruct-2509",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "HuggingFaceTB/SmolLM2-1.7B", "google/gemma-2b",
    "microsoft/Phi-3.5-mini-instruct", "intfloat/e5-mistral-7b-instruct", "Qwen/Qwen3-Embedding-8B",
}


def test_every_paper_model_has_a_config():
    assert {entry["model"] for entry in PROVENANCE.values()} == PAPER_MODELS
    assert {p.stem for p in CONFIGS.glob("*--*.json")} == set(PROVENANCE)


@pytest.mark.parametrize("name", sorted(PROVENANCE))
def test_paper_model_builds_abstractly(name):
    expected = PROVENANCE[name]
    config, shapes = abstract_decoder(CONFIGS / f"{name}.json")
    assert (config.family, config.hidden_size, config.num_layers) == (
        expected["family"], expected["hidden_size"], expected["num_layers"])
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes)) == expected["params"]
    assert all(leaf.shape[0] == config.num_layers for leaf in jax.tree_util.tree_leaves(shapes["layers"]))
    if expected["paper_embedding_dim"] and "(sic)" not in expected.get("note", ""):
        assert config.hidden_size == expected["paper_embedding_dim"]


def test_mixture_of_experts_shapes_of_qwen3_30b_a3b():
    config, shapes = abstract_decoder(CONFIGS / "Qwen--Qwen3-30B-A3B-Instruct-2507.json")
    assert (config.moe.num_experts, config.moe.top_k, config.moe.normalize_top_k) == (128, 8, True)
    mlp = shapes["layers"]["mlp"]
    assert mlp["experts_gate_proj"].shape == (48, 128, 2048, 768)
    assert mlp["experts_down_proj"].shape == (48, 128, 768, 2048)
    assert mlp["router"]["kernel"].shape == (48, 2048, 128)


def test_abstract_decoder_rejects_an_encoder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LinalignError, match="'bert' is not a decoder"):
        abstract_decoder(tmp_path)
