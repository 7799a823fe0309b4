"""BERT encoders (MiniLM, all-MiniLM-L6-v2): post-LN layers, learned absolute positions, token-type embeddings.

The post-LN layer here is also MPNet's (mpnet.py adds a relative-position bias to the attention scores), and its
LayerNorms and MLP are the shared core's `Norm` and `Mlp` (LayerNorm with bias; plain up/down MLP with biases).
The core's attention is causal, so the bidirectional attention lives here. Layers are stacked with `nn.scan`, the
layout `checkpoint.params_from_tensors` produces.

Position ids come from the attention mask (cumsum - 1), so left-padded batches give the same states for real tokens
as right-padded ones; HF BERT uses arange(T), which agrees for its standard right padding.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from linalign_jax.errors import LinalignError
from linalign_jax.models import checkpoint, core
from linalign_jax.models.base import LoadedModel, ModelOutput
from linalign_jax.models.tokenizer import load_tokenizer

# Added to the scores of padded keys. Finite, so a row with no real key (a batch-filler row) gives a uniform softmax
# instead of NaN.
MASKED_SCORE = -1e30
# HF `hidden_act` -> the core's activation names.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class EncoderConfigBase:
    """Fields every encoder config has, and the view of them that core.Norm / core.Mlp read.

    Subclasses are frozen dataclasses with (at least) hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, layer_norm_eps, hidden_act and dtype.
    """

    norm = "layer"            # core.Norm: LayerNorm with bias
    norm_unit_offset = False
    gated_mlp = False         # core.Mlp: up_proj -> activation -> down_proj, all with biases
    out_bias = True

    def __post_init__(self):
        if self.hidden_act not in HF_ACTIVATIONS:
            raise LinalignError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(HF_ACTIVATIONS)}")
        if self.dtype not in core.DTYPES:
            raise LinalignError(f"unsupported dtype {self.dtype!r}; supported: {', '.join(core.DTYPES)}")
        if self.hidden_size % self.num_attention_heads:
            raise LinalignError(f"hidden_size={self.hidden_size} is not a multiple of "
                                f"num_attention_heads={self.num_attention_heads}")

    @property
    def norm_eps(self) -> float:
        return self.layer_norm_eps

    @property
    def activation(self) -> str:
        return HF_ACTIVATIONS[self.hidden_act]

    @property
    def compute_dtype(self):
        return core.DTYPES[self.dtype]

    @classmethod
    def from_hf(cls, hf: dict, dtype: str = "float32"):
        """The config from HF config.json fields of the same names."""
        fields = [f for f in dataclasses.fields(cls) if f.name != "dtype"]
        missing = [f.name for f in fields if f.name not in hf and f.default is dataclasses.MISSING]
        if missing:
            raise LinalignError(f"config.json lacks {missing} for a {cls.__name__}")
        return cls(**{f.name: hf[f.name] for f in fields if f.name in hf}, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class BertConfig(EncoderConfigBase):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"
    pad_token_id: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()
        if self.position_embedding_type != "absolute":
            raise LinalignError(f"unsupported BERT position_embedding_type {self.position_embedding_type!r}; "
                                "expected 'absolute'")


def check_length(length: int, max_tokens: int) -> None:
    """Learned position tables end: a longer (static) sequence would silently read clipped positions."""
    if length > max_tokens:
        raise LinalignError(f"sequence length {length} exceeds the {max_tokens} positions this model has; "
                            f"use max_length <= {max_tokens}")


def padding_bias(attention_mask: jax.Array) -> jax.Array:
    """[B, T] 0/1 mask -> [B, 1, 1, T] float32 additive bias hiding padded keys from every query."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, MASKED_SCORE).astype(jnp.float32)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with biased q/k/v/out projections and an additive score bias."""

    config: EncoderConfigBase

    @nn.compact
    def __call__(self, x: jax.Array, attn_bias: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, width = x.shape
        head_dim = width // cfg.num_attention_heads
        q, k, v = (nn.Dense(width, dtype=cfg.compute_dtype, name=name)(x).reshape(
            batch, length, cfg.num_attention_heads, head_dim) for name in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        probs = jax.nn.softmax(scores + attn_bias, axis=-1).astype(v.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, width)
        return nn.Dense(width, dtype=cfg.compute_dtype, name="out")(context)


class PostLNLayer(nn.Module):
    """Attention and MLP, each followed by residual add and LayerNorm; scanned over layers (y = the layer output
    when collecting hidden states, else nothing)."""

    config: EncoderConfigBase
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, attn_bias: jax.Array):
        cfg = self.config
        x = core.Norm(cfg, name="attention_norm")(x + SelfAttention(cfg, name="attention")(x, attn_bias))
        x = core.Norm(cfg, name="output_norm")(x + core.Mlp(cfg, name="mlp")(x))
        return x, (x if self.collect_hidden else None)


def encoder_stack(config: EncoderConfigBase, embeddings: jax.Array, attn_bias: jax.Array,
                  output_hidden_states: bool) -> ModelOutput:
    """The scanned layers (parameters under "layers"); call inside a compact module."""
    layers = nn.scan(PostLNLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=config.num_hidden_layers)
    x, per_layer = layers(config, output_hidden_states, name="layers")(embeddings, attn_bias)
    hidden = None
    if output_hidden_states:
        hidden = (embeddings, *[per_layer[i] for i in range(config.num_hidden_layers)])
    return ModelOutput(last_hidden_state=x, hidden_states=hidden)


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 output_hidden_states: bool = False) -> ModelOutput:
        cfg = self.config

        def embed(num, name):
            return nn.Embed(num, cfg.hidden_size, dtype=cfg.compute_dtype, name=name)

        check_length(input_ids.shape[1], cfg.max_position_embeddings)
        position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
             + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
             + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids)))
        x = core.Norm(cfg, name="embeddings_norm")(x)
        return encoder_stack(cfg, x, padding_bias(attention_mask), output_hidden_states)


# ------------------------------------------------------------------------------------------ checkpoint mapping

def linear_rules(hf: str, ours: str) -> Tuple[checkpoint.Rule, ...]:
    return (f"{hf}.weight", f"{ours}/kernel", "T"), (f"{hf}.bias", f"{ours}/bias", "")


def norm_rules(hf: str, ours: str) -> Tuple[checkpoint.Rule, ...]:
    return (f"{hf}.weight", f"{ours}/scale", ""), (f"{hf}.bias", f"{ours}/bias", "")


def embedding_rules(names: Sequence[str]) -> Tuple[checkpoint.Rule, ...]:
    return (*((f"embeddings.{n}.weight", f"{n}/embedding", "") for n in names),
            *norm_rules("embeddings.LayerNorm", "embeddings_norm"))


LAYER = "encoder.layer.{i}."
# HF names (task checkpoints' "bert." prefix stripped) -> our parameter paths; "{i}" rows stack under "layers/".
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
HF_PREFIX = "bert."


def load(model_dir: Path, *, spec: str, dtype: str = "float32") -> LoadedModel:
    """A HF BERT directory (config.json, safetensors, tokenizer.json) -> LoadedModel."""
    return load_encoder(model_dir, spec=spec, dtype=dtype, family="bert", config_cls=BertConfig,
                        module_cls=BertEncoder, rules=HF_RULES, ignored=HF_IGNORED, prefix=HF_PREFIX)


def load_encoder(model_dir: Path, *, spec: str, dtype: str, family: str, config_cls, module_cls,
                 rules: Sequence[checkpoint.Rule], ignored: Sequence[str], prefix: str) -> LoadedModel:
    """Shared by the encoder families: read config, map the checkpoint through `rules`, wrap it as a LoadedModel."""
    model_dir = Path(model_dir)
    config = config_cls.from_hf(json.loads((model_dir / "config.json").read_text()), dtype=dtype)
    module = module_cls(config)
    tensors = {name[len(prefix):] if name.startswith(prefix) else name: value
               for name, value in checkpoint.read_checkpoint(model_dir).items()}
    params = checkpoint.params_from_tensors(tensors, rules, config.num_hidden_layers, config.compute_dtype,
                                            ignore=ignored, family=family)
    ids = jnp.zeros((1, 2), jnp.int32)
    checkpoint.check_shapes(params, jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, ids + 1)["params"],
                            family)
    tokenizer = load_tokenizer(model_dir)  # before the jit below: a missing tokenizer.json fails fast

    @functools.partial(jax.jit, static_argnums=(3,))
    def forward(params, input_ids, attention_mask, output_hidden_states=False):
        return module.apply({"params": params}, input_ids, attention_mask, output_hidden_states)

    return LoadedModel(spec=spec, family=family, config=config, module=module,
                       params=jax.tree_util.tree_map(jnp.asarray, params), tokenizer=tokenizer,
                       fingerprint=fingerprint(model_dir, config, family), is_decoder=False,
                       pad_token_id=config.pad_token_id, dtype=dtype, forward_fn=forward)


def fingerprint(model_dir: Path, config, family: str) -> str:
    """Weights and the config as run (dtype included): the same weights in bfloat16 give other features."""
    hashes = [checkpoint.cached_sha256(f) for f in checkpoint.weight_files(model_dir)]
    return checkpoint.fingerprint_from_hashes(hashes + [core.config_hash(config)], family)
