"""Llama family (Llama-2/3/3.1/3.2, Mistral, SmolLM2): RMSNorm, SwiGLU, RoPE (default/linear/llama3/yarn), GQA.

Also the base the other RoPE families extend: `decoder_fields` reads the HF config keys they share, `rope_from_hf`
reads both config generations (transformers 4: `rope_theta` + `rope_scaling`; transformers 5: `rope_parameters`,
per layer type for gemma3), and `GLOBAL_RULES` / `LAYER_RULES` are the checkpoint names they share.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.errors import LinalignError
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule, causal_lm_names
from linalign_jax.models.core import FULL, SLIDING, DecoderConfig, RopeConfig, activation_from_hf


GLOBAL_RULES: Tuple[Rule, ...] = (
    ("model.embed_tokens.weight", "embed/embedding", ""),
    ("model.norm.weight", "final_norm/scale", ""),
)
UNTIED_RULES: Tuple[Rule, ...] = (("lm_head.weight", "lm_head", "T"),)
ATTENTION_RULES: Tuple[Rule, ...] = tuple(
    (f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"attn/{p}_proj/kernel", "T") for p in "qkvo")
MLP_RULES: Tuple[Rule, ...] = tuple(
    (f"model.layers.{{i}}.mlp.{p}_proj.weight", f"mlp/{p}_proj/kernel", "T") for p in ("gate", "up", "down"))
PRE_NORM_RULES: Tuple[Rule, ...] = (
    ("model.layers.{i}.input_layernorm.weight", "attn_norm/scale", ""),
    ("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm/scale", ""),
)
LAYER_RULES: Tuple[Rule, ...] = ATTENTION_RULES + MLP_RULES + PRE_NORM_RULES
# Buffers some exporters leave in checkpoints; recomputed from the config.
IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")


normalize_names = causal_lm_names  # base-model checkpoints (e5-mistral) have no `model.` prefix


def head_rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    """lm_head.weight for untied models that have one (a base-model checkpoint has none)."""
    return UNTIED_RULES if config.has_lm_head and not config.tie_embeddings else ()


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    return GLOBAL_RULES + LAYER_RULES + head_rules(config)


def ignore(config: DecoderConfig) -> Tuple[str, ...]:
    # Tied checkpoints sometimes still store lm_head.weight (a copy of the embedding).
    return IGNORE + ((r"lm_head\.weight",) if config.tie_embeddings else ())


def rope_from_hf(hf: Dict[str, Any], layer_type: str = FULL) -> RopeConfig:
    """RopeConfig for one layer type from either config generation."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:  # transformers 5, per layer type (gemma3)
        params = params[layer_type]
    if not params:  # transformers 4: rope_theta (+ gemma3's rope_local_base_freq) and rope_scaling
        if layer_type == SLIDING and "rope_local_base_freq" in hf:
            params = {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}
        else:
            params = dict(hf.get("rope_scaling") or {})
            params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 0)
    optional = {k: params[k] for k in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                                       "attention_factor", "mscale", "mscale_all_dim", "truncate")
                if params.get(k) is not None}
    return RopeConfig(theta=float(params.get("rope_theta", 10000.0)), kind=kind,
                      factor=float(params.get("factor") or 1.0), original_max_position_embeddings=int(original),
                      **optional)


def decoder_fields(hf: Dict[str, Any], dtype: str) -> Dict[str, Any]:
    """The DecoderConfig fields every RoPE family reads the same way (not the activation: each family reads its
    own, see `core.activation_from_hf`)."""
    try:
        heads = hf["num_attention_heads"]
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            pad_token_id=_first_id(hf.get("pad_token_id"), hf.get("eos_token_id"), 0), rope=rope_from_hf(hf),
            dtype=dtype)
    except KeyError as e:
        raise LinalignError(f"config.json lacks {e.args[0]!r}, needed for a {hf.get('model_type')} model") from None
    return fields


def sliding_fields(hf: Dict[str, Any], default_sliding: bool) -> Dict[str, Any]:
    """layer_types and sliding_window: explicit `layer_types` if given, else every layer slides or none does."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is None:
        types = [SLIDING if (window and default_sliding) else FULL] * hf["num_hidden_layers"]
    return dict(layer_types=tuple(types), sliding_window=window if SLIDING in types else None)


def _first_id(*candidates) -> int:
    for c in candidates:
        if isinstance(c, list):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return 0


def silu(hf: Dict[str, Any]) -> str:
    """The activation of the SwiGLU families (llama, mistral, qwen): `hidden_act` must be silu."""
    return activation_from_hf(hf, "hidden_act", {"silu": "silu"}, default="silu")


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    # Mistral's sliding_window applies to every layer; Llama configs carry none.
    return DecoderConfig(family="llama", **decoder_fields(hf, dtype), **sliding_fields(hf, default_sliding=True),
                         activation=silu(hf))


FAMILY = Family(name="llama", model_types=("llama", "mistral"), kind=DECODER, config_from_hf=config_from_hf,
                rules=rules, ignore=ignore, normalize_names=normalize_names)
