"""What the bidirectional encoder families (bert.py, mpnet.py, ...) share: the config base, post-LN layers, padding
masks and checkpoint-rule builders.

The post-LN layer is BERT's and MPNet's (MPNet adds a relative-position bias to the scores); its LayerNorms and MLP
are the shared core's `Norm` and `Mlp`, configured through `EncoderConfig.norm_config` / `.mlp_config` (LayerNorm
with bias; plain up/down MLP with biases). Attention is bidirectional, through attention.py (fused or explicit, by
the config's `attention` field), with padded keys masked.
Layers are stacked with `nn.scan`, the layout `checkpoint.params_from_tensors` produces.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from linalign_jax.errors import LinalignError
from linalign_jax.models import attention as attention_ops
from linalign_jax.models import checkpoint, core
from linalign_jax.models.base import ModelOutput

# HF `hidden_act` -> the core's activation names.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Base of every encoder config (each family's own frozen dataclass): the shape every encoder has (config.json
    names; the first fields of every family's config), validation, reading config.json, and the views the shared
    layers read.

    Subclasses add (at least) layer_norm_eps, hidden_act, pad_token_id, attention (attention.IMPLEMENTATIONS, default
    "auto"; not part of the fingerprint) and dtype; a family whose norm or MLP differs overrides `norm_config` /
    `mlp_config`.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int

    def __post_init__(self):
        if self.attention not in attention_ops.IMPLEMENTATIONS:
            raise LinalignError(f"unknown attention {self.attention!r}; expected one of "
                                f"{', '.join(attention_ops.IMPLEMENTATIONS)}")
        if self.hidden_act not in HF_ACTIVATIONS:
            raise LinalignError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(HF_ACTIVATIONS)}")
        if self.dtype not in core.DTYPES:
            raise LinalignError(f"unsupported dtype {self.dtype!r}; supported: {', '.join(core.DTYPES)}")
        if self.hidden_size % self.num_attention_heads:
            raise LinalignError(f"hidden_size={self.hidden_size} is not a multiple of "
                                f"num_attention_heads={self.num_attention_heads}")

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table holds (a family whose positions start later overrides it)."""
        return self.max_position_embeddings

    @property
    def compute_dtype(self):
        return core.DTYPES[self.dtype]

    @property
    def norm_config(self) -> core.NormConfig:
        return core.NormConfig(kind="layer", eps=self.layer_norm_eps)

    @property
    def mlp_config(self) -> core.MlpConfig:
        return core.MlpConfig(self.hidden_size, self.intermediate_size, HF_ACTIVATIONS[self.hidden_act], gated=False,
                              bias=True, dtype=self.dtype)

    @classmethod
    def from_hf(cls, hf: dict, dtype: str = "float32"):
        """The config from HF config.json fields of the same names."""
        fields = [f for f in dataclasses.fields(cls) if f.name not in ("dtype", "attention")]
        missing = [f.name for f in fields if f.name not in hf and f.default is dataclasses.MISSING]
        if missing:
            raise LinalignError(f"config.json lacks {missing} for a {cls.__name__}")
        return cls(**{f.name: hf[f.name] for f in fields if f.name in hf}, dtype=dtype)


def check_length(length: int, max_tokens: int) -> None:
    """Learned position tables end: a longer (static) sequence would silently read clipped positions."""
    if length > max_tokens:
        raise LinalignError(f"sequence length {length} exceeds the {max_tokens} positions this model has; "
                            f"use max_length <= {max_tokens}")


class EncoderModule(nn.Module):
    """The forward every encoder family shares: the static length checked against the position table
    (`config.max_tokens`), the family's summed embeddings (`embed_tokens`), the embeddings norm, then the family's
    layers (`encode`). Subclasses define those two; `table` is one embedding table in the compute dtype."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 output_hidden_states: bool = False) -> ModelOutput:
        check_length(input_ids.shape[1], self.config.max_tokens)
        x = core.Norm(self.config.norm_config, name="embeddings_norm")(self.embed_tokens(input_ids, attention_mask))
        return self.encode(x, input_ids, attention_mask, output_hidden_states)

    def table(self, num: int, name: str, features: int | None = None) -> nn.Embed:
        return nn.Embed(num, features or self.config.hidden_size, dtype=self.config.compute_dtype, name=name)

    def embed_tokens(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        raise NotImplementedError

    def encode(self, x: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
               output_hidden_states: bool) -> ModelOutput:
        raise NotImplementedError


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] 0/1 mask -> [B, 1, 1, T] bool: padded keys are hidden from every query."""
    return attention_mask[:, None, None, :] > 0


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with biased q/k/v/out projections, through attention.py: `mask` [B, 1, 1, T]
    hides padded keys, `bias` (None or [1, H, T, T]) is added to the scaled scores (MPNet's relative positions)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, bias) -> jax.Array:
        cfg = self.config
        batch, length, width = x.shape
        head_dim = width // cfg.num_attention_heads
        q, k, v = (nn.Dense(width, dtype=cfg.compute_dtype, name=name)(x).reshape(
            batch, length, cfg.num_attention_heads, head_dim) for name in ("query", "key", "value"))
        context = attention_ops.attention(q, k, v, scale=1.0 / math.sqrt(head_dim), mask=mask, bias=bias,
                                          implementation=cfg.attention)
        return nn.Dense(width, dtype=cfg.compute_dtype, name="out")(context.reshape(batch, length, width))


class PostLNLayer(nn.Module):
    """Attention and MLP, each followed by residual add and LayerNorm; scanned over layers (y = the layer output
    when collecting hidden states, else nothing)."""

    config: EncoderConfig
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, bias):
        cfg = self.config
        x = core.Norm(cfg.norm_config, name="attention_norm")(x + SelfAttention(cfg, name="attention")(x, mask, bias))
        x = core.Norm(cfg.norm_config, name="output_norm")(x + core.Mlp(cfg.mlp_config, name="mlp")(x))
        return x, (x if self.collect_hidden else None)


def encoder_stack(config: EncoderConfig, embeddings: jax.Array, attention_mask: jax.Array, output_hidden_states: bool,
                  bias=None) -> ModelOutput:
    """The scanned layers (parameters under "layers") over real keys of `attention_mask` [B, T], with an optional
    score bias; call inside a compact module."""
    layers = nn.scan(PostLNLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast), length=config.num_hidden_layers)
    x, per_layer = layers(config, output_hidden_states, name="layers")(embeddings, padding_mask(attention_mask), bias)
    hidden = None
    if output_hidden_states:
        hidden = (embeddings, *[per_layer[i] for i in range(config.num_hidden_layers)])
    return ModelOutput(last_hidden_state=x, hidden_states=hidden)


# ------------------------------------------------------------------------------------------ checkpoint mapping

LAYER = "encoder.layer.{i}."  # HF's per-layer prefix in BERT-style checkpoints; "{i}" rows stack under "layers/"


def linear_rules(hf: str, ours: str) -> Tuple[checkpoint.Rule, ...]:
    return (f"{hf}.weight", f"{ours}/kernel", "T"), (f"{hf}.bias", f"{ours}/bias", "")


def norm_rules(hf: str, ours: str) -> Tuple[checkpoint.Rule, ...]:
    return (f"{hf}.weight", f"{ours}/scale", ""), (f"{hf}.bias", f"{ours}/bias", "")


def embedding_rules(names: Sequence[str]) -> Tuple[checkpoint.Rule, ...]:
    return (*((f"embeddings.{n}.weight", f"{n}/embedding", "") for n in names),
            *norm_rules("embeddings.LayerNorm", "embeddings_norm"))

