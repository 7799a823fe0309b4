"""The one interface every model family implements, so later stages never look at family details.

A family module (llama.py, bert.py, ...) ends with a `Family` record: how to read its HF config into a frozen config
dataclass (hashable: a static argument of `jax.jit`), and the table mapping HF checkpoint names to parameter paths.
`models/registry.py` lists the families; `load_model` (models/loader.py) runs the same pipeline for all of them and
returns a `LoadedModel`.

Forward contract, identical for encoders and decoders:
    outputs = model.forward(params, input_ids[B, T] int32, attention_mask[B, T] int32, output_hidden_states=False)
    outputs.last_hidden_state  [B, T, d]  hidden state after the final norm (what the paper aligns)
    outputs.hidden_states      tuple of [B, T, d] (embeddings output, then every layer) or None
Position ids are derived from the attention mask (cumsum - 1), so left and right padding give the same states for
the real tokens. Decoders also provide `lm_head(params, hidden) -> logits [..., vocab]`, usable on *mapped* states.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax

from linalign_jax.models.conventions import EmbeddingConventions

DECODER, ENCODER = "decoder", "encoder"


def no_ignores(config) -> Tuple[str, ...]:
    return ()


def same_names(tensors: Dict[str, Any]) -> Dict[str, Any]:
    return tensors


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture as the loader reads it (see models/loader.py for the pipeline).

    kind DECODER: `config_from_hf` returns a `core.DecoderConfig` and the module is always `core.Decoder`.
    kind ENCODER: `config_from_hf` returns the family's own config (an `encoder.EncoderConfig` subclass) and
    `module(config)` builds the Flax module, called as module.apply({"params": p}, ids, mask, output_hidden_states).
    """

    name: str                                       # encoders: LoadedModel.family; decoders: DecoderConfig.family
    #                                                 names it (one Family may read several, e.g. gemma + gemma2)
    model_types: Tuple[str, ...]                    # config.json `model_type` values this family reads
    kind: str                                       # DECODER | ENCODER
    config_from_hf: Callable[[dict, str], Any]      # (config.json dict, dtype) -> frozen config
    rules: Callable[[Any], Sequence[tuple]]         # config -> checkpoint rules (checkpoint.Rule)
    ignore: Callable[[Any], Sequence[str]] = no_ignores          # config -> regexes of tensors the model does not use
    normalize_names: Callable[[Dict[str, Any]], Dict[str, Any]] = same_names  # e.g. strip a "bert." prefix
    module: Optional[Callable[[Any], Any]] = None   # encoders: config -> flax.linen.Module

    def __post_init__(self):
        if self.kind not in (DECODER, ENCODER):
            raise ValueError(f"family {self.name}: kind {self.kind!r} is not {DECODER!r} or {ENCODER!r}")
        if (self.kind == ENCODER) != (self.module is not None):
            raise ValueError(f"family {self.name}: encoders need `module`, decoders use core.Decoder")


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    last_hidden_state: jax.Array
    hidden_states: Optional[Tuple[jax.Array, ...]] = None


jax.tree_util.register_dataclass(
    ModelOutput, data_fields=["last_hidden_state", "hidden_states"], meta_fields=[])


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: everything a later stage needs, and a fingerprint that identifies the weights."""

    spec: str                      # what the user asked for (asset name, hub id or path)
    family: str                    # "llama", "qwen2", "qwen3", "gemma3", "gpt2", "bert", "mpnet"
    config: Any                    # the family's frozen config dataclass
    module: Any                    # flax.linen.Module built from config
    params: Any                    # parameter pytree (jax arrays)
    tokenizer: Any                 # tokenizers.Tokenizer (fast, with offsets)
    fingerprint: str               # sha256 over the weight files (+ family), keys the feature cache
    is_decoder: bool
    pad_token_id: int
    dtype: str = "float32"
    # How the model wants to be run as an embedder (prompt, EOS, pooling, ...): see models/conventions.py.
    conventions: EmbeddingConventions = EmbeddingConventions()
    forward_fn: Callable[..., ModelOutput] = None          # (params, ids, mask, output_hidden_states) -> ModelOutput
    lm_head_fn: Optional[Callable[..., jax.Array]] = None  # (params, hidden) -> logits; decoders only
    # Incremental decoding, decoders only (see models/core.py): a preallocated KV cache and a jitted step.
    init_cache_fn: Optional[Callable[..., Any]] = None     # (batch_size, max_length) -> KVCache
    extend_fn: Optional[Callable[..., Any]] = None         # (params, ids, mask, cache, output_hidden_states)
    #                                                        -> (ModelOutput, KVCache)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, params, input_ids, attention_mask, output_hidden_states: bool = False) -> ModelOutput:
        return self.forward_fn(params, input_ids, attention_mask, output_hidden_states)

    def lm_head(self, params, hidden):
        if self.lm_head_fn is None:
            raise TypeError(f"{self.spec} ({self.family}) is an encoder: it has no LM head")
        return self.lm_head_fn(params, hidden)

    def init_cache(self, batch_size: int, max_length: int):
        if self.init_cache_fn is None:
            raise TypeError(f"{self.spec} ({self.family}) is an encoder: it has no KV cache")
        return self.init_cache_fn(batch_size, max_length)

    def extend(self, params, input_ids, attention_mask, cache, output_hidden_states: bool = False):
        """Run new tokens on top of `cache` (prefill or one decoding step) -> (ModelOutput, updated cache)."""
        if self.extend_fn is None:
            raise TypeError(f"{self.spec} ({self.family}) is an encoder: it cannot decode incrementally")
        return self.extend_fn(params, input_ids, attention_mask, cache, output_hidden_states)
