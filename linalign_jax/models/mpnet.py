"""MPNet encoders (all-mpnet-base-v2): the shared post-LN encoder layers (encoder.py) plus a T5-style
relative-position bias.

Deltas from BERT (bert.py): no token types; absolute positions start at padding_idx + 1 (RoBERTa convention, padded
slots get padding_idx); one bucketed relative-position bias table is shared by all layers and added to the attention
scores. Relative positions depend only on index differences, so they are the same for left and right padding.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax.models import core
from linalign_jax.models.base import ENCODER, Family, ModelOutput
from linalign_jax.models.checkpoint import strip_prefix
from linalign_jax.models.encoder import (LAYER, EncoderConfig, EncoderModule, embedding_rules, encoder_stack,
                                         linear_rules, norm_rules)

# HF's MPNetEmbeddings hard-codes padding_idx = 1 (whatever config.pad_token_id says); positions are offset by it.
HF_PADDING_IDX = 1
# HF's MPNetEncoder.relative_position_bucket default.
MAX_DISTANCE = 128


@dataclasses.dataclass(frozen=True)
class MPNetConfig(EncoderConfig):
    layer_norm_eps: float
    relative_attention_num_buckets: int = 32
    hidden_act: str = "gelu"
    pad_token_id: int = 1
    attention: str = "auto"
    dtype: str = "float32"

    @property
    def max_tokens(self) -> int:
        """Positions start after HF's padding index (RoBERTa-style), so the table holds two fewer tokens."""
        return self.max_position_embeddings - HF_PADDING_IDX - 1


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """Bucket of each (key index - query index), exactly as HF MPNet computes it (float32 log, then truncation).

    Half the buckets are for keys before the query, half for keys after; within each half, distances below a quarter
    of the buckets are exact and larger ones share log-spaced buckets, saturating at max_distance.
    """
    n = -np.asarray(relative_position, dtype=np.int64)
    half = num_buckets // 2
    bucket = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    log_ratio = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)))
    large = np.minimum(max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64), half - 1)
    return bucket + np.where(n < max_exact, n, large)


@functools.lru_cache(maxsize=64)
def relative_position_buckets(length: int, num_buckets: int) -> np.ndarray:
    """[length, length] buckets for a sequence of `length`; static per shape, so computed once with numpy."""
    positions = np.arange(length)
    return relative_position_bucket(positions[None, :] - positions[:, None], num_buckets)


class MPNetEncoder(EncoderModule):
    def embed_tokens(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        position_ids = jnp.cumsum(attention_mask, axis=-1) * attention_mask + HF_PADDING_IDX
        return (self.table(cfg.vocab_size, "word_embeddings")(input_ids)
                + self.table(cfg.max_position_embeddings, "position_embeddings")(position_ids))

    def encode(self, x, input_ids, attention_mask, output_hidden_states) -> ModelOutput:
        cfg = self.config
        buckets = relative_position_buckets(input_ids.shape[1], cfg.relative_attention_num_buckets)
        relative_bias = self.table(cfg.relative_attention_num_buckets, "relative_attention_bias",
                                   cfg.num_attention_heads)(jnp.asarray(buckets))  # [T, T, H]
        return encoder_stack(cfg, x, attention_mask, output_hidden_states, bias=relative_bias.transpose(2, 0, 1)[None])


HF_RULES = (
    *embedding_rules(("word_embeddings", "position_embeddings")),
    ("encoder.relative_attention_bias.weight", "relative_attention_bias/embedding", ""),
    *linear_rules(LAYER + "attention.attn.q", "attention/query"),
    *linear_rules(LAYER + "attention.attn.k", "attention/key"),
    *linear_rules(LAYER + "attention.attn.v", "attention/value"),
    *linear_rules(LAYER + "attention.attn.o", "attention/out"),
    *norm_rules(LAYER + "attention.LayerNorm", "attention_norm"),
    *linear_rules(LAYER + "intermediate.dense", "mlp/up_proj"),
    *linear_rules(LAYER + "output.dense", "mlp/down_proj"),
    *norm_rules(LAYER + "output.LayerNorm", "output_norm"),
)
HF_IGNORED = (r"embeddings\.position_ids", r"pooler\..*", r"lm_head\..*")
FAMILY = Family(name="mpnet", model_types=("mpnet",), kind=ENCODER, config_from_hf=MPNetConfig.from_hf,
                rules=lambda config: HF_RULES, ignore=lambda config: HF_IGNORED,
                normalize_names=strip_prefix("mpnet."), module=MPNetEncoder)
