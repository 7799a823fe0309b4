"""Gemma 3 text decoder: embeddings scaled by sqrt(d), (1 + w) RMSNorms before and after attention and MLP, q/k
RMSNorm, GeGLU (tanh gelu), tied embeddings, query scale query_pre_attn_scalar ** -0.5, and interleaved local
(sliding-window, RoPE base `rope_local_base_freq`) and global layers (RoPE base `rope_theta`, with any scaling).
Multimodal checkpoints (Gemma3ForConditionalGeneration) are read for their language model only.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.models import checkpoint, llama
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule
from linalign_jax.models.core import FULL, SLIDING, DecoderConfig, activation_from_hf

SLIDING_PATTERN = 6  # older configs: every 6th layer is global
NORM_RULES: Tuple[Rule, ...] = (
    ("model.layers.{i}.input_layernorm.weight", "attn_norm/scale", ""),
    ("model.layers.{i}.post_attention_layernorm.weight", "attn_post_norm/scale", ""),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "mlp_norm/scale", ""),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "mlp_post_norm/scale", ""),
    ("model.layers.{i}.self_attn.q_norm.weight", "attn/q_norm/scale", ""),
    ("model.layers.{i}.self_attn.k_norm.weight", "attn/k_norm/scale", ""),
)
IGNORE = llama.IGNORE + checkpoint.VISION_IGNORE
GELU_TANH = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def ignore(config: DecoderConfig) -> Tuple[str, ...]:
    return IGNORE + ((r"lm_head\.weight",) if config.tie_embeddings else ())


normalize_names = checkpoint.language_model_names


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    return llama.GLOBAL_RULES + llama.ATTENTION_RULES + llama.MLP_RULES + NORM_RULES + llama.head_rules(config)


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    hf = dict(hf.get("text_config") or hf)  # a multimodal config nests the text model's
    activation = activation_from_hf(hf, "hidden_activation", GELU_TANH, default="gelu_pytorch_tanh")
    hf.setdefault("tie_word_embeddings", True)
    if hf.get("layer_types") is None:
        pattern = hf.get("sliding_window_pattern", SLIDING_PATTERN)
        hf["layer_types"] = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(hf["num_hidden_layers"])]
    hf.setdefault("rope_local_base_freq", 10000.0)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return DecoderConfig(
        family="gemma3", **llama.decoder_fields(hf, dtype), **llama.sliding_fields(hf, default_sliding=False),
        local_rope=llama.rope_from_hf(hf, SLIDING), norm_unit_offset=True, activation=activation, qk_norm=True,
        sandwich_norms=True, embed_scale=True, query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        attn_logit_softcap=hf.get("attn_logit_softcapping"), final_logit_softcap=hf.get("final_logit_softcapping"))


FAMILY = Family(name="gemma3", model_types=("gemma3_text", "gemma3"), kind=DECODER, config_from_hf=config_from_hf,
                rules=rules, ignore=ignore, normalize_names=normalize_names)
