"""Every model family the loader knows. Adding one = its module (ending with a `Family` record) + one entry here."""
from __future__ import annotations

from typing import Dict, List

from linalign_jax.models import (apertus, bert, gemma, gemma3, gpt2, llama, mistral3, mixtral, modernbert, mpnet,
                                  olmo, phi3, qwen, qwen_moe, xlm_roberta)
from linalign_jax.models.base import Family

FAMILIES = (
    # decoders (core.Decoder with a DecoderConfig)
    llama.FAMILY,
    qwen.QWEN2,
    qwen.QWEN3,
    gemma3.FAMILY,
    gpt2.FAMILY,
    gemma.FAMILY,
    olmo.FAMILY,
    apertus.FAMILY,
    phi3.FAMILY,
    mistral3.FAMILY,
    qwen_moe.FAMILY,
    mixtral.FAMILY,
    # encoders (their own modules)
    bert.FAMILY,
    mpnet.FAMILY,
    xlm_roberta.FAMILY,
    modernbert.FAMILY,
)


def _by_model_type(families) -> Dict[str, Family]:
    table: Dict[str, Family] = {}
    for family in families:
        for model_type in family.model_types:
            if model_type in table:
                raise ValueError(f"model_type {model_type!r} claimed by {table[model_type].name} and {family.name}")
            table[model_type] = family
    return table


REGISTRY: Dict[str, Family] = _by_model_type(FAMILIES)


def supported_model_types() -> List[str]:
    return sorted(REGISTRY)
