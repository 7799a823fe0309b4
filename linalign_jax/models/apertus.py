"""Apertus (Swiss AI): Llama with RMSNorm on q and k per head, a plain (ungated) MLP with the xIELU activation,
whose learned scalars live in each layer's checkpoint (`mlp.act_fn.*`), and norms named attention_layernorm /
feedforward_layernorm.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.models import llama, qwen
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule
from linalign_jax.models.core import XIELU, DecoderConfig, activation_from_hf

LAYER_RULES: Tuple[Rule, ...] = llama.ATTENTION_RULES + qwen.QK_NORM_RULES + (
    ("model.layers.{i}.mlp.up_proj.weight", "mlp/up_proj/kernel", "T"),
    ("model.layers.{i}.mlp.down_proj.weight", "mlp/down_proj/kernel", "T"),
    ("model.layers.{i}.attention_layernorm.weight", "attn_norm/scale", ""),
    ("model.layers.{i}.feedforward_layernorm.weight", "mlp_norm/scale", ""),
) + tuple((f"model.layers.{{i}}.mlp.act_fn.{p}", f"mlp/act/{p}", "") for p in ("alpha_p", "alpha_n", "beta", "eps"))
ignore = llama.ignore
normalize_names = llama.normalize_names


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    return llama.GLOBAL_RULES + LAYER_RULES + llama.head_rules(config)


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    activation = activation_from_hf(hf, "hidden_act", {XIELU: XIELU}, default=XIELU)
    fields = llama.decoder_fields({"rms_norm_eps": 1e-5, **hf}, dtype)
    return DecoderConfig(family="apertus", **fields, activation=activation, gated_mlp=False, qk_norm=True)


FAMILY = Family(name="apertus", model_types=("apertus",), kind=DECODER, config_from_hf=config_from_hf, rules=rules,
                ignore=ignore, normalize_names=normalize_names)
