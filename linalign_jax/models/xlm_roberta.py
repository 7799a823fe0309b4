"""XLM-RoBERTa and RoBERTa encoders (intfloat/e5-*, intfloat/multilingual-e5-*, BAAI/bge-m3, ...): BERT's layers
and checkpoint names with RoBERTa's positions.

The one delta from bert.py: position ids start at padding_idx + 1 (padding_idx = config.pad_token_id, 1 in every
published checkpoint) and padded slots get padding_idx, so a 514-row table holds 512 tokens. HF derives them from
`input_ids != padding_idx`; we derive them from the attention mask, which agrees wherever padded slots hold the pad
id and also keeps left padding exact. One token type (type_vocab_size 1). RoBERTa's modeling is the same code.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from linalign_jax.models import bert
from linalign_jax.models.base import ENCODER, Family
from linalign_jax.models.checkpoint import strip_prefix


@dataclasses.dataclass(frozen=True)
class XLMRobertaConfig(bert.BertConfig):
    pad_token_id: int = 1

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings - self.pad_token_id - 1

    def position_ids(self, attention_mask: jax.Array) -> jax.Array:
        return jnp.cumsum(attention_mask, axis=-1) * attention_mask + self.pad_token_id


# Buffers and heads the encoder does not use (MaskedLM head, pooler, sequence-classification head).
HF_IGNORED = (r"embeddings\.position_ids", r"pooler\..*", r"lm_head\..*", r"classifier\..*")

FAMILY = Family(name="xlm-roberta", model_types=("xlm-roberta", "roberta"), kind=ENCODER,
                config_from_hf=XLMRobertaConfig.from_hf, rules=lambda config: bert.HF_RULES,
                ignore=lambda config: HF_IGNORED, normalize_names=strip_prefix("roberta."), module=bert.BertEncoder)
