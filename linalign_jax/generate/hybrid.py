"""Hybrid decoding (paper §2.4): the source model's body reads the text, the target model's frozen head writes it.

Each step: the source's final hidden state (post final norm) → affine map → target LM head → target token → bytes →
text (held back while a UTF-8 character is incomplete) → re-encoded with the source tokenizer → source KV cache. The
re-encoding is canonical: the whole text is re-encoded and the cache rolled back to the longest common prefix of
old and new source ids, so the source always sees the tokenization it was trained on, even when a new piece merges
with the previous source token ("Hel" + "lo" → "Hello").

`linalign_jax.generate.evaluation` scores the same computation teacher-forced, batched.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from linalign_jax import tokenizer_compat
from linalign_jax.align.maps import AffineMap, load_map
from linalign_jax.errors import LinalignError
from linalign_jax.generate.decoding import (DecoderState, GenerationResult, bucket, check_decoder, check_max_new_tokens,
                                            check_prompt, decode_loop)
from linalign_jax.generate.sampling import SamplingConfig
from linalign_jax.models.base import LoadedModel


class HybridBody:
    """The source model reading a text that grows by whatever the target head emits."""

    def __init__(self, source: LoadedModel, prompt: str, max_new_tokens: int):
        self.feed = tokenizer_compat.SourceTokenFeed(source.tokenizer)
        _, ids = self.feed.update(prompt)
        self.state = DecoderState(source, bucket(len(ids)) + max_new_tokens)
        self.state.prefill(ids)
        self.text = prompt
        self.stats = {"prompt_tokens": len(ids), "source_tokens_fed": len(ids), "rollbacks": 0}

    @property
    def hidden(self):
        return self.state.hidden

    def advance(self, token: int, piece: str) -> None:
        if not piece:  # a special token or an unfinished UTF-8 character: the source sees no new text yet
            return
        self.text += piece
        keep, new_ids = self.feed.update(self.text)
        if keep < self.state.num_tokens:
            self.state.truncate(keep)
            self.stats["rollbacks"] += 1
        for token_id in new_ids:
            self.state.append(token_id)
        self.stats["source_tokens_fed"] += len(new_ids)


class HybridPair:
    """A source body, a target head and the map between them, checked once; reusable across prompts."""

    def __init__(self, source: LoadedModel, target: LoadedModel, affine: AffineMap):
        check_decoder(source, "source")
        check_decoder(target, "target")
        tokenizer_compat.as_fast_tokenizer(source.tokenizer, f"source tokenizer ({source.spec})")
        tokenizer_compat.as_fast_tokenizer(target.tokenizer, f"target tokenizer ({target.spec})")
        check_map_dims(affine, source, target)
        self.source, self.target = source, target
        self.affine = AffineMap(W=jnp.asarray(affine.W, jnp.float32), b=jnp.asarray(affine.b, jnp.float32))
        self.byte_table = tokenizer_compat.token_byte_table(target.tokenizer, target.config.vocab_size)
        self.continuation = jax.device_put(tokenizer_compat.ContinuationTable.from_byte_table(self.byte_table))

    def generate(self, prompt: str, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 key: Optional[jax.Array] = None, stop_strings: Sequence[str] = (),
                 eos_ids: Optional[Sequence[int]] = None, record_logits: bool = False) -> GenerationResult:
        check_prompt(prompt)
        check_max_new_tokens(max_new_tokens)
        body = HybridBody(self.source, prompt, max_new_tokens)
        return decode_loop(body, self.target, prompt, max_new_tokens=max_new_tokens, sampling=sampling, key=key,
                           stop_strings=stop_strings, eos_ids=eos_ids, affine=self.affine,
                           byte_table=self.byte_table, continuation=self.continuation, record_logits=record_logits)


def check_map_dims(affine: AffineMap, source: LoadedModel, target: LoadedModel) -> None:
    if affine.source_dim != source.hidden_size or affine.target_dim != target.hidden_size:
        raise LinalignError(
            f"map is {affine.source_dim} → {affine.target_dim}, but source {source.spec!r} has d={source.hidden_size} "
            f"and target {target.spec!r} has d={target.hidden_size}")


def load_pair_map(path, source: LoadedModel, target: LoadedModel) -> Tuple[AffineMap, dict]:
    """A saved map (`linalign_jax.align.maps`) checked to connect exactly these two models (fingerprints and dims)."""
    return load_map(path, source=source.fingerprint, target=target.fingerprint, source_dim=source.hidden_size,
                    target_dim=target.hidden_size)
