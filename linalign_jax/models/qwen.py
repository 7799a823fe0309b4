"""Qwen2 / Qwen2.5 (Llama plus q/k/v biases) and Qwen3 (Llama plus RMSNorm over head_dim on q and k).

Both carry `sliding_window` in their configs but use it only with `use_sliding_window`, and then only in layers from
`max_window_layers` on; transformers 5 configs spell this out as `layer_types`.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.models import llama
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule
from linalign_jax.models.core import FULL, SLIDING, DecoderConfig

BIAS_RULES: Tuple[Rule, ...] = tuple(
    (f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"attn/{p}_proj/bias", "") for p in "qkv")
QK_NORM_RULES: Tuple[Rule, ...] = tuple(
    (f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"attn/{p}_norm/scale", "") for p in "qk")
ignore = llama.ignore
normalize_names = llama.normalize_names


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    return llama.rules(config) + (BIAS_RULES if config.qkv_bias else ()) + (QK_NORM_RULES if config.qk_norm else ())


def _layer_types(hf: Dict[str, Any]) -> Dict[str, Any]:
    if hf.get("layer_types") is None and hf.get("use_sliding_window"):
        first = hf.get("max_window_layers", 0)
        hf = {**hf, "layer_types": [SLIDING if i >= first else FULL for i in range(hf["num_hidden_layers"])]}
    return llama.sliding_fields(hf, default_sliding=False)


def qwen2_config(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    return DecoderConfig(family="qwen2", **llama.decoder_fields(hf, dtype), **_layer_types(hf),
                         activation=llama.silu(hf), qkv_bias=True)


def qwen3_config(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    return DecoderConfig(family="qwen3", **llama.decoder_fields(hf, dtype), **_layer_types(hf),
                         activation=llama.silu(hf), qkv_bias=bool(hf.get("attention_bias", False)), qk_norm=True)


QWEN2 = Family(name="qwen2", model_types=("qwen2",), kind=DECODER, config_from_hf=qwen2_config, rules=rules,
               ignore=ignore, normalize_names=normalize_names)
QWEN3 = Family(name="qwen3", model_types=("qwen3",), kind=DECODER, config_from_hf=qwen3_config, rules=rules,
               ignore=ignore, normalize_names=normalize_names)
