"""GPT-2: learned absolute positions, LayerNorm with bias, a plain gelu (tanh) MLP, biases everywhere, tied head.

Its Conv1D layers store weights as [in, out], so they map to Dense kernels without a transpose, and the fused
`c_attn` is split into q, k and v. Checkpoints come with or without the `transformer.` prefix.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule, strip_prefix
from linalign_jax.models.core import DecoderConfig, RopeConfig, activation_from_hf

RULES: Tuple[Rule, ...] = (
    ("wte.weight", "embed/embedding", ""),
    ("wpe.weight", "pos_embed/embedding", ""),
    ("ln_f.weight", "final_norm/scale", ""),
    ("ln_f.bias", "final_norm/bias", ""),
    ("h.{i}.ln_1.weight", "attn_norm/scale", ""),
    ("h.{i}.ln_1.bias", "attn_norm/bias", ""),
    ("h.{i}.attn.c_attn.weight", "attn/{qkv}_proj/kernel", "split3"),
    ("h.{i}.attn.c_attn.bias", "attn/{qkv}_proj/bias", "split3"),
    ("h.{i}.attn.c_proj.weight", "attn/o_proj/kernel", ""),
    ("h.{i}.attn.c_proj.bias", "attn/o_proj/bias", ""),
    ("h.{i}.ln_2.weight", "mlp_norm/scale", ""),
    ("h.{i}.ln_2.bias", "mlp_norm/bias", ""),
    ("h.{i}.mlp.c_fc.weight", "mlp/up_proj/kernel", ""),
    ("h.{i}.mlp.c_fc.bias", "mlp/up_proj/bias", ""),
    ("h.{i}.mlp.c_proj.weight", "mlp/down_proj/kernel", ""),
    ("h.{i}.mlp.c_proj.bias", "mlp/down_proj/bias", ""),
)
GELU_TANH = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# Causal-mask buffers of old exports, and the tied head.
IGNORE = (r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight")


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    return RULES


def ignore(config: DecoderConfig) -> Tuple[str, ...]:
    return IGNORE


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    activation = activation_from_hf(hf, "activation_function", GELU_TANH, default="gelu_new")
    d, heads = hf["n_embd"], hf["n_head"]
    return DecoderConfig(
        family="gpt2", vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"], num_heads=heads,
        num_kv_heads=heads, head_dim=d // heads, intermediate_size=hf.get("n_inner") or 4 * d,
        max_position_embeddings=hf["n_positions"], norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=activation, gated_mlp=False, qkv_bias=True, out_bias=True, learned_positions=True,
        rope=RopeConfig(), tie_embeddings=True, pad_token_id=int(hf.get("pad_token_id") or hf.get("eos_token_id") or 0),
        dtype=dtype)


FAMILY = Family(name="gpt2", model_types=("gpt2",), kind=DECODER, config_from_hf=config_from_hf, rules=rules,
                ignore=ignore, normalize_names=strip_prefix("transformer."))
