"""OLMo 2 and OLMo 3 (AllenAI): Llama with the norms moved *after* attention and MLP (no pre-norms) and RMSNorm on
q and k over all heads at once (weights [heads * head_dim], before the head split). OLMo 3 adds sliding-window
layers (three of every four by default) whose RoPE is plain while full layers may carry a scaling (yarn).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.models import llama, qwen
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule
from linalign_jax.models.core import FULL, SLIDING, DecoderConfig, RopeConfig

DEFAULT_THETA = 500000.0
LAYER_RULES: Tuple[Rule, ...] = llama.ATTENTION_RULES + llama.MLP_RULES + qwen.QK_NORM_RULES + (
    ("model.layers.{i}.post_attention_layernorm.weight", "attn_post_norm/scale", ""),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "mlp_post_norm/scale", ""),
)
ignore = llama.ignore
normalize_names = llama.normalize_names


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    return llama.GLOBAL_RULES + LAYER_RULES + llama.head_rules(config)


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    hf = {"rope_theta": DEFAULT_THETA, "rms_norm_eps": 1e-5, **hf}
    sliding: Dict[str, Any] = {}
    if hf["model_type"] == "olmo3":
        hf.setdefault("sliding_window", 4096)
        if hf.get("layer_types") is None:
            hf["layer_types"] = [FULL if (i + 1) % 4 == 0 else SLIDING for i in range(hf["num_hidden_layers"])]
        nested = isinstance(hf.get("rope_parameters"), dict) and SLIDING in hf["rope_parameters"]
        # transformers 4 configs: rope_scaling applies to the full-attention layers only.
        local = llama.rope_from_hf(hf, SLIDING) if nested else RopeConfig(theta=float(hf["rope_theta"]))
        sliding = dict(**llama.sliding_fields(hf, default_sliding=False), local_rope=local)
    return DecoderConfig(family=hf["model_type"], **llama.decoder_fields(hf, dtype), **sliding, qk_norm=True,
                         activation=llama.silu(hf), qk_norm_all_heads=True, pre_norms=False, sandwich_norms=True)


FAMILY = Family(name="olmo", model_types=("olmo2", "olmo3"), kind=DECODER, config_from_hf=config_from_hf,
                rules=rules, ignore=ignore, normalize_names=normalize_names)
