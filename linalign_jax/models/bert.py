"""BERT encoders (MiniLM, all-MiniLM-L6-v2): post-LN layers, learned absolute positions, token-type embeddings.

The layers are the shared encoder's (encoder.py). Position ids come from the attention mask (cumsum - 1), so
left-padded batches give the same states for real tokens as right-padded ones; HF BERT uses arange(T), which agrees
for its standard right padding.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from linalign_jax.errors import LinalignError
from linalign_jax.models import core
from linalign_jax.models.base import ENCODER, Family, ModelOutput
from linalign_jax.models.checkpoint import strip_prefix
from linalign_jax.models.encoder import (LAYER, EncoderConfig, EncoderModule, embedding_rules, encoder_stack,
                                         linear_rules, norm_rules)


@dataclasses.dataclass(frozen=True)
class BertConfig(EncoderConfig):
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"
    pad_token_id: int = 0
    attention: str = "auto"
    dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()
        if self.position_embedding_type != "absolute":
            raise LinalignError(f"unsupported BERT position_embedding_type {self.position_embedding_type!r}; "
                                "expected 'absolute'")

    def position_ids(self, attention_mask: jax.Array) -> jax.Array:
        return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)


class BertEncoder(EncoderModule):
    def embed_tokens(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        return (self.table(cfg.vocab_size, "word_embeddings")(input_ids)
                + self.table(cfg.max_position_embeddings, "position_embeddings")(cfg.position_ids(attention_mask))
                + self.table(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids)))

    def encode(self, x, input_ids, attention_mask, output_hidden_states) -> ModelOutput:
        return encoder_stack(self.config, x, attention_mask, output_hidden_states)


# ------------------------------------------------------------------------------------------ checkpoint mapping

# HF names (task checkpoints' "bert." prefix stripped) -> our parameter paths.
HF_RULES = (
    *embedding_rules(("word_embeddings", "position_embeddings", "token_type_embeddings")),
    *linear_rules(LAYER + "attention.self.query", "attention/query"),
    *linear_rules(LAYER + "attention.self.key", "attention/key"),
    *linear_rules(LAYER + "attention.self.value", "attention/value"),
    *linear_rules(LAYER + "attention.output.dense", "attention/out"),
    *norm_rules(LAYER + "attention.output.LayerNorm", "attention_norm"),
    *linear_rules(LAYER + "intermediate.dense", "mlp/up_proj"),
    *linear_rules(LAYER + "output.dense", "mlp/down_proj"),
    *norm_rules(LAYER + "output.LayerNorm", "output_norm"),
)
# Buffers and heads the encoder does not use.
HF_IGNORED = (r"embeddings\.position_ids", r"pooler\..*", r"cls\..*")

FAMILY = Family(name="bert", model_types=("bert",), kind=ENCODER, config_from_hf=BertConfig.from_hf,
                rules=lambda config: HF_RULES, ignore=lambda config: HF_IGNORED,
                normalize_names=strip_prefix("bert."), module=BertEncoder)
