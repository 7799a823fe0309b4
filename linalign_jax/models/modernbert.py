"""ModernBERT encoders (answerdotai/ModernBERT-*, and the embedding models built on them).

Deltas from BERT: pre-LN layers (the first layer has no attention norm) with a final norm, no biases by default
(`attention_bias`, `mlp_bias`, `norm_bias` in config.json), a fused Wqkv projection, a GeGLU MLP (Wi gives
[input; gate], out = Wo(act(input) * gate)), no position table but RoPE with one base on global layers and another
on local ones, and local layers that see only keys within `local_attention // 2` positions on either side.
Every third layer is global by default (`global_attn_every_n_layers`, or an explicit `layer_types` list).
config.json comes in two spellings: the published one (global_rope_theta / local_rope_theta) and transformers 5's
`rope_parameters` per layer type; both are read.

Positions come from the attention mask (cumsum - 1) as everywhere here; HF uses arange(T), which agrees for right
padding. Attention goes through attention.py (fused or explicit); the window is a mask on positions.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.models import attention as attention_ops
from linalign_jax.models import core
from linalign_jax.models.base import ENCODER, Family, ModelOutput
from linalign_jax.models.checkpoint import strip_prefix
from linalign_jax.models.encoder import HF_ACTIVATIONS, EncoderConfig, EncoderModule

DEFAULT_THETA = {core.FULL: 160000.0, core.SLIDING: 10000.0}  # ModernBertConfig.default_theta


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(EncoderConfig):
    layer_types: Tuple[str, ...]
    local_attention: int = 128          # the local window's total width; keys within half of it are visible
    global_rope_theta: float = DEFAULT_THETA[core.FULL]
    local_rope_theta: float = DEFAULT_THETA[core.SLIDING]
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    attention_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    pad_token_id: int = 50283
    attention: str = "auto"             # attention.IMPLEMENTATIONS
    dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {core.FULL, core.SLIDING}:
            raise LinalignError(f"layer_types must be {self.num_hidden_layers} of {core.FULL!r}/{core.SLIDING!r}, "
                                f"got {self.layer_types}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def norm_config(self) -> core.NormConfig:
        return core.NormConfig(kind="layer", eps=self.layer_norm_eps, bias=self.norm_bias)


def config_from_hf(hf: dict, dtype: str = "float32") -> ModernBertConfig:
    layers = hf["num_hidden_layers"]
    every = hf.get("global_attn_every_n_layers", 3)
    layer_types = tuple(hf.get("layer_types") or (core.SLIDING if i % every else core.FULL for i in range(layers)))
    rope = hf.get("rope_parameters") or {}

    def theta(layer_type: str, legacy_key: str) -> float:
        params = rope.get(layer_type) or {}
        if params.get("rope_type", "default") != "default":
            raise LinalignError(f"ModernBERT rope_type {params['rope_type']!r} is not supported; expected 'default'")
        return float(params.get("rope_theta", hf.get(legacy_key, DEFAULT_THETA[layer_type])))

    optional = {k: hf[k] for k in ("local_attention", "attention_bias", "mlp_bias", "norm_bias", "pad_token_id")
                if k in hf}
    return ModernBertConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=layers,
        num_attention_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"], layer_types=layer_types,
        global_rope_theta=theta(core.FULL, "global_rope_theta"), local_rope_theta=theta(core.SLIDING, "local_rope_theta"),
        layer_norm_eps=hf.get("norm_eps", 1e-5), hidden_act=hf.get("hidden_activation", "gelu"), dtype=dtype,
        **optional)


class Layer(nn.Module):
    """Pre-LN attention + GeGLU MLP; scanned. xs = (is_sliding, has_attn_norm) per layer."""

    config: ModernBertConfig
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, x, xs, ctx):
        cfg = self.config
        is_sliding, has_attn_norm = xs
        B, T, d = x.shape
        dense = lambda n, bias, name: nn.Dense(n, use_bias=bias, dtype=cfg.compute_dtype, name=name)  # noqa: E731
        normed = core.Norm(cfg.norm_config, name="attn_norm")(x)
        h = jnp.where(has_attn_norm, normed, x)  # HF's first layer has an identity here (its weight is a stub)
        qkv = dense(3 * d, cfg.attention_bias, "qkv")(h).reshape(B, T, 3, cfg.num_attention_heads, cfg.head_dim)
        cos = jnp.where(is_sliding, ctx["cos_local"], ctx["cos"])
        sin = jnp.where(is_sliding, ctx["sin_local"], ctx["sin"])
        q, k = core.rotate(qkv[:, :, 0], cos, sin), core.rotate(qkv[:, :, 1], cos, sin)
        mask = jnp.where(is_sliding, ctx["local_mask"], ctx["global_mask"])
        out = attention_ops.attention(q, k, qkv[:, :, 2], scale=cfg.head_dim ** -0.5, mask=mask,
                                      implementation=cfg.attention)
        x = x + dense(d, cfg.attention_bias, "out")(out.reshape(B, T, d))
        up, gate = jnp.split(dense(2 * cfg.intermediate_size, cfg.mlp_bias, "wi")(
            core.Norm(cfg.norm_config, name="mlp_norm")(x)), 2, axis=-1)
        x = x + dense(d, cfg.mlp_bias, "wo")(core.ACTIVATIONS[HF_ACTIVATIONS[cfg.hidden_act]](up) * gate)
        return x, (x if self.collect_hidden else None)


class ModernBertEncoder(EncoderModule):
    def embed_tokens(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return self.table(self.config.vocab_size, "tok_embeddings")(input_ids)

    def encode(self, x, input_ids, attention_mask, output_hidden_states) -> ModelOutput:
        cfg = self.config
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        real_keys = (attention_mask > 0)[:, None, None, :]                      # [B, 1, 1, T]
        near = jnp.abs(positions[:, :, None] - positions[:, None, :]) <= cfg.local_attention // 2
        ctx = {"global_mask": real_keys, "local_mask": real_keys & near[:, None]}
        for suffix, theta in (("", cfg.global_rope_theta), ("_local", cfg.local_rope_theta)):
            ctx["cos" + suffix], ctx["sin" + suffix] = core.rope_tables(core.RopeConfig(theta=theta), cfg.head_dim,
                                                                        positions)
        layers = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast), length=cfg.num_hidden_layers)
        xs = (jnp.asarray([t == core.SLIDING for t in cfg.layer_types]),
              jnp.arange(cfg.num_hidden_layers) > 0)
        out, per_layer = layers(cfg, output_hidden_states, name="layers")(x, xs, ctx)
        hidden = core.Norm(cfg.norm_config, name="final_norm")(out)
        all_hidden = None
        if output_hidden_states:  # embeddings, then every layer's output (before the final norm, as decoders)
            all_hidden = (x, *[per_layer[i] for i in range(cfg.num_hidden_layers)])
        return ModelOutput(last_hidden_state=hidden, hidden_states=all_hidden)


# ------------------------------------------------------------------------------------------ checkpoint mapping

FIRST_ATTN_NORM = "layers.0.attn_norm.weight"


def rules(config: ModernBertConfig):
    def linear(hf: str, ours: str, bias: bool):
        return ((f"{hf}.weight", f"{ours}/kernel", "T"),) + (((f"{hf}.bias", f"{ours}/bias", ""),) if bias else ())

    def norm(hf: str, ours: str):
        return ((f"{hf}.weight", f"{ours}/scale", ""),) + (((f"{hf}.bias", f"{ours}/bias", ""),)
                                                           if config.norm_bias else ())

    layer = "layers.{i}."
    return (("embeddings.tok_embeddings.weight", "tok_embeddings/embedding", ""),
            *norm("embeddings.norm", "embeddings_norm"),
            *norm(layer + "attn_norm", "attn_norm"),
            *linear(layer + "attn.Wqkv", "qkv", config.attention_bias),
            *linear(layer + "attn.Wo", "out", config.attention_bias),
            *norm(layer + "mlp_norm", "mlp_norm"),
            *linear(layer + "mlp.Wi", "wi", config.mlp_bias),
            *linear(layer + "mlp.Wo", "wo", config.mlp_bias),
            *norm("final_norm", "final_norm"))


def normalize_names(tensors: dict) -> dict:
    """Strip ForMaskedLM's "model." prefix; give layer 0 the attention-norm weights it lacks (ones, zero bias), so
    all layers stack; the module applies an identity there instead."""
    tensors = strip_prefix("model.")(tensors)
    if FIRST_ATTN_NORM not in tensors and "layers.1.attn_norm.weight" in tensors:
        reference = tensors["layers.1.attn_norm.weight"]
        tensors = {**tensors, FIRST_ATTN_NORM: np.ones(reference.shape, np.float32)}
        if "layers.1.attn_norm.bias" in tensors:
            tensors["layers.0.attn_norm.bias"] = np.zeros(reference.shape, np.float32)
    return tensors


# MaskedLM / classification heads the encoder does not use.
HF_IGNORED = (r"head\..*", r"decoder\..*", r"classifier\..*", r"drop\..*")

FAMILY = Family(name="modernbert", model_types=("modernbert",), kind=ENCODER, config_from_hf=config_from_hf,
                rules=rules, ignore=lambda config: HF_IGNORED, normalize_names=normalize_names,
                module=ModernBertEncoder)
