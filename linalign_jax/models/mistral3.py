"""Mistral 3 (Ministral 3, Mistral Small 3.x): a multimodal checkpoint whose language model is read alone, as for
gemma3. Ministral 3's text model is Mistral plus Llama 4 attention scaling: queries times
1 + beta * log(1 + floor(position / original_max_position_embeddings)), after RoPE (yarn in the released models).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.models import checkpoint, llama
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.core import DecoderConfig

normalize_names = checkpoint.language_model_names
rules = llama.rules


def ignore(config: DecoderConfig) -> Tuple[str, ...]:
    return llama.ignore(config) + checkpoint.VISION_IGNORE


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    text = dict(hf.get("text_config") or hf)  # a multimodal config nests the text model's
    text.setdefault("model_type", "mistral")
    if "tie_word_embeddings" in hf:  # the multimodal model's own flag decides (transformers ties by it)
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    scaling = {}
    if rope.get("llama_4_scaling_beta"):
        scaling = dict(query_position_beta=float(rope["llama_4_scaling_beta"]),
                       query_position_period=int(rope["original_max_position_embeddings"]))
    return DecoderConfig(family=hf["model_type"], **llama.decoder_fields(text, dtype),
                         **llama.sliding_fields(text, default_sliding=True), activation=llama.silu(text), **scaling)


FAMILY = Family(name="mistral3", model_types=("mistral3", "ministral3"), kind=DECODER,
                config_from_hf=config_from_hf, rules=rules, ignore=ignore, normalize_names=normalize_names)
