"""Gemma (1) and Gemma 2: embeddings scaled by sqrt(d), (1 + w) RMSNorms, GeGLU (tanh gelu), tied embeddings.
Gemma 2 adds gemma3's norms after attention and MLP, query scale query_pre_attn_scalar ** -0.5, logit soft-capping
in attention and at the head, and alternating sliding-window / global layers (no q/k norms, one RoPE).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.models import gemma3, llama
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule
from linalign_jax.models.core import FULL, SLIDING, DecoderConfig, activation_from_hf

# "gelu" is gemma's legacy name for the tanh form
TANH_GELU = {"gelu": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
SANDWICH_RULES: Tuple[Rule, ...] = tuple(r for r in gemma3.NORM_RULES if ".self_attn." not in r[0])
ignore = llama.ignore
normalize_names = llama.normalize_names


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    norms = SANDWICH_RULES if config.sandwich_norms else llama.PRE_NORM_RULES
    return llama.GLOBAL_RULES + llama.ATTENTION_RULES + llama.MLP_RULES + norms + llama.head_rules(config)


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    gemma2 = hf["model_type"] == "gemma2"
    key = "hidden_activation" if gemma2 and hf.get("hidden_activation") else "hidden_act"
    activation = activation_from_hf(hf, key, TANH_GELU, default="gelu_pytorch_tanh")
    hf = {"tie_word_embeddings": True, **hf}
    common = dict(family=hf["model_type"], **llama.decoder_fields(hf, dtype), norm_unit_offset=True,
                  activation=activation, embed_scale=True)
    if not gemma2:
        return DecoderConfig(**common)
    if hf.get("layer_types") is None:
        hf["layer_types"] = [SLIDING if (i + 1) % 2 else FULL for i in range(hf["num_hidden_layers"])]
    head_dim = common["head_dim"]
    return DecoderConfig(
        **common, **llama.sliding_fields(hf, default_sliding=False), sandwich_norms=True,
        query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        attn_logit_softcap=hf.get("attn_logit_softcapping"), final_logit_softcap=hf.get("final_logit_softcapping"))


FAMILY = Family(name="gemma", model_types=("gemma", "gemma2"), kind=DECODER, config_from_hf=config_from_hf,
                rules=rules, ignore=ignore, normalize_names=normalize_names)
