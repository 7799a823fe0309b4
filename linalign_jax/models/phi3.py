"""Phi-3 / Phi-3.5 (Microsoft): Llama with fused projections (qkv_proj = q|k|v rows, gate_up_proj = gate|up rows,
cut apart on load), every layer sliding over `sliding_window`, and LongRoPE: per-frequency short / long factors
(the long ones once a sequence passes `original_max_position_embeddings`) with cos/sin scaled by
sqrt(1 + ln(max / original) / ln(original)).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.errors import LinalignError
from linalign_jax.models import llama
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule
from linalign_jax.models.core import DecoderConfig, RopeConfig

ignore = llama.ignore
normalize_names = llama.normalize_names


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    q, kv, f = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    return llama.GLOBAL_RULES + llama.PRE_NORM_RULES + llama.head_rules(config) + (
        ("model.layers.{i}.self_attn.qkv_proj.weight", "attn/{q|k|v}_proj/kernel", f"Tsplit:{q},{kv},{kv}"),
        ("model.layers.{i}.self_attn.o_proj.weight", "attn/o_proj/kernel", "T"),
        ("model.layers.{i}.mlp.gate_up_proj.weight", "mlp/{gate|up}_proj/kernel", f"Tsplit:{f},{f}"),
        ("model.layers.{i}.mlp.down_proj.weight", "mlp/down_proj/kernel", "T"),
    )


def _rope(hf: Dict[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LinalignError("phi3 with partial_rotary_factor != 1 (partial RoPE) is not supported")
    if params.get("rope_type", params.get("type")) != "longrope":
        return llama.rope_from_hf(hf)
    original = int(params.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
    return RopeConfig(theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), kind="longrope",
                      factor=float(params.get("factor") or hf["max_position_embeddings"] / original),
                      original_max_position_embeddings=original, attention_factor=params.get("attention_factor"),
                      short_factor=tuple(map(float, params["short_factor"])),
                      long_factor=tuple(map(float, params["long_factor"])))


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    fields = {**llama.decoder_fields({"rms_norm_eps": 1e-5, **hf}, dtype), "rope": _rope(hf)}
    return DecoderConfig(family="phi3", **fields, **llama.sliding_fields(hf, default_sliding=True),
                         activation=llama.silu(hf))


FAMILY = Family(name="phi3", model_types=("phi3",), kind=DECODER, config_from_hf=config_from_hf, rules=rules,
                ignore=ignore, normalize_names=normalize_names)
