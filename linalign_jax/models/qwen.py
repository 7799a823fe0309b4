"""Qwen2 / Qwen2.5 (Llama plus q/k/v biases) and Qwen3 (Llama plus RMSNorm over head_dim on q and k).

Both carry `sliding_window` in their configs but use it only with `use_sliding_window`, and then only in layers from
`max_window_layers` on; transformers 5 configs spell this out as `layer_types`.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.models import llama
from linalign_jax.models.checkpoint import Rule
from linalign_jax.models.core import FULL, SLIDING, DecoderConfig

MODEL_TYPES = ("qwen2", "qwen3")
BIAS_RULES: Tuple[Rule, ...] = tuple(
    (f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"attn/{p}_proj/bias", "") for p in "qkv")
QK_NORM_RULES: Tuple[Rule, ...] = tuple(
    (f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"attn/{p}_norm/scale", "") for p in "qk")
ignore = llama.ignore


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    return llama.rules(config) + (BIAS_RULES if config.qkv_bias else ()) + (QK_NORM_RULES if config.qk_norm else ())


def _layer_types(hf: Dict[str, Any]) -> Dict[str, Any]:
    if hf.get("layer_types") is None and hf.get("use_sliding_window"):
        first = hf.get("max_window_layers", 0)
        hf = {**hf, "layer_types": [SLIDING if i >= first else FULL for i in range(hf["num_hidden_layers"])]}
    return llama.sliding_fields(hf, default_sliding=False)


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    family = hf.get("model_type", "qwen2")
    qwen3 = family == "qwen3"
    return DecoderConfig(family=family, **llama.decoder_fields(hf, dtype), **_layer_types(hf),
                         qkv_bias=bool(hf.get("attention_bias", False)) if qwen3 else True, qk_norm=qwen3)
