"""Hybrid decoding (paper §2.4): the source model's body reads the text, the target model's frozen head writes it.

Each step: the source's final hidden state (post final norm) → affine map → target LM head → target token → bytes →
text (held back while a UTF-8 character is incomplete) → re-encoded with the source tokenizer → source KV cache. The
re-encoding is canonical: the whole text is re-encoded and the cache rolled back to the longest common prefix of
old and new source ids, so the source always sees the tokenization it was trained on, even when a new piece merges
with the previous source token ("Hel" + "lo" → "Hello"). Prompts decode in batches; every row re-encodes, rolls
back and advances on its own (`decoding.CacheRows`).

`linalign_jax.generate.evaluation` scores the same computation teacher-forced, batched.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from linalign_jax import tokenizer_compat
from linalign_jax.align.maps import AffineMap, load_map
from linalign_jax.errors import LinalignError
from linalign_jax.generate.decoding import (DEFAULT_BATCH_SIZE, GenerationResult, PrefilledRows, StopAt,
                                            check_decode_options, check_decoder, check_max_new_tokens, check_prompts,
                                            decode_rows, default_eos_ids, run_batches)
from linalign_jax.generate.sampling import SamplingConfig
from linalign_jax.models.base import LoadedModel
from linalign_jax.shapes import MIN_SEQUENCE, bucket


class HybridRows(PrefilledRows):
    """Source bodies of a batch: each row is the source model reading a text that grows by whatever the target head
    emits for it. Rows advance by different numbers of source tokens (0 while a character is incomplete, 1 usually,
    more after a merge rollback) and roll back independently."""

    # Extra source slots per generated token: re-fed tails after rollbacks also take slots; when they run out the
    # cache is compacted (same shape), so this only sets how often.
    SLACK = 1.25

    def __init__(self, source: LoadedModel, prompts: Sequence[str], batch_size: int, max_new_tokens: int,
                 add_special_tokens: bool = True):
        self.feeds = [tokenizer_compat.SourceTokenFeed(source.tokenizer, add_special_tokens) for _ in prompts]
        ids = [feed.update(prompt)[1] for feed, prompt in zip(self.feeds, prompts)]
        super().__init__(source, ids, batch_size,
                         bucket(max(map(len, ids)), MIN_SEQUENCE) + int(self.SLACK * max_new_tokens) + 1)
        self.texts = list(prompts)
        for stats, i in zip(self.stats, ids):
            stats.update(source_tokens_fed=len(i), rollbacks=0)

    def advance(self, tokens: Dict[int, tuple]) -> None:
        keep, queues = {}, {}
        for row, (_, piece) in tokens.items():
            if not piece:  # a special token or an unfinished UTF-8 character: the source sees no new text yet
                continue
            self.texts[row] += piece
            kept, new_ids = self.feeds[row].update(self.texts[row])
            if kept < self.rows.counts[row]:
                keep[row] = kept
                self.stats[row]["rollbacks"] += 1
            queues[row] = new_ids
            self.stats[row]["source_tokens_fed"] += len(new_ids)
        if keep:
            self.rows.truncate(keep)
        self.rows.feed_queues(queues)


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

    def generate_batch(self, prompts: Sequence[str], *, max_new_tokens: int,
                       sampling: SamplingConfig = SamplingConfig(), key: Optional[jax.Array] = None,
                       stop_strings: Sequence[str] = (), stop_at: Optional[StopAt] = None,
                       eos_ids: Optional[Sequence[int]] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                       record_logits: bool = False, add_special_tokens: bool = True) -> List[GenerationResult]:
        """Hybrid continuations of every prompt, `batch_size` at a time (see `decoding.generate_batch`)."""
        prompts = check_prompts(prompts)
        check_max_new_tokens(max_new_tokens)
        check_decode_options(sampling, key, stop_strings, batch_size)
        eos = set(default_eos_ids(self.target.tokenizer) if eos_ids is None else eos_ids)
        lengths = [len(p) for p in prompts]  # characters: sorting only needs to group similar lengths

        def decode_batch(chunk, keys):
            body = HybridRows(self.source, [prompts[i] for i in chunk], len(keys), max_new_tokens, add_special_tokens)
            return decode_rows(body, self.target, [prompts[i] for i in chunk], keys, max_new_tokens=max_new_tokens,
                               sampling=sampling, stop_strings=stop_strings, stop_at=stop_at, eos=eos,
                               affine=self.affine, byte_table=self.byte_table, continuation=self.continuation,
                               record_logits=record_logits)

        return run_batches(prompts, lengths, batch_size, key, decode_batch)

    def generate(self, prompt: str, **kwargs) -> GenerationResult:
        """One prompt (a batch of one)."""
        return self.generate_batch(check_prompts([prompt]), batch_size=1, **kwargs)[0]


def check_map_dims(affine: AffineMap, source: LoadedModel, target: LoadedModel) -> None:
    if affine.source_dim != source.hidden_size or affine.target_dim != target.hidden_size:
        raise LinalignError(
            f"map is {affine.source_dim} → {affine.target_dim}, but source {source.spec!r} has d={source.hidden_size} "
            f"and target {target.spec!r} has d={target.hidden_size}")


def load_pair_map(path, source: LoadedModel, target: LoadedModel) -> Tuple[AffineMap, dict]:
    """A saved map (`linalign_jax.align.maps`) checked to connect exactly these two models (fingerprints and dims)."""
    return load_map(path, source=source.fingerprint, target=target.fingerprint, source_dim=source.hidden_size,
                    target_dim=target.hidden_size)
