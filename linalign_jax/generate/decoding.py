"""Incremental decoding on a decoder's preallocated KV cache (`LoadedModel.init_cache_fn` / `extend_fn`, layout in
`linalign_jax.models.core`), for one sequence.

The device work per step is two jitted calls with static shapes: `extend` of one token on a cache of S slots, then
the head + token choice. Prompts are left-padded to a power-of-two bucket and caches are allocated in power-of-two
sizes, so a run compiles a handful of shapes however long its prompts are. The host loop between steps does what
needs text: bytes → UTF-8, stop strings, EOS.

`decode_loop` is shared by native and hybrid decoding: a *body* owns a KV cache and exposes the final hidden state
that predicts the next token; the loop maps it (optionally), applies a head, picks a token, turns it into text and
hands (token, text) back to the body to advance. `NativeBody` feeds the token itself; the hybrid body
(`linalign_jax.generate.hybrid`) feeds the text to another model.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax import tokenizer_compat
from linalign_jax.errors import LinalignError
from linalign_jax.generate.sampling import SamplingConfig, mask_logits, sample_logits
from linalign_jax.models import core
from linalign_jax.models.base import LoadedModel

MIN_BUCKET = 16
# End-of-sequence markers of the families we load; used when the caller gives no eos ids.
EOS_TOKENS = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum): the static length a prompt is padded to, or a cache is sized to."""
    return 1 << (max(int(n), minimum) - 1).bit_length()


def default_eos_ids(tokenizer) -> tuple:
    """Ids of the special tokens in `EOS_TOKENS` that this tokenizer defines."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return tuple(sorted(vocab[t] for t in EOS_TOKENS if t in vocab))


def check_decoder(model: LoadedModel, role: str = "model") -> None:
    if not model.is_decoder or model.extend_fn is None or model.lm_head_fn is None:
        raise LinalignError(f"{role} {model.spec!r} ({model.family}) is not a decoder; generation needs a causal LM")


# ------------------------------------------------------------------------------------------------ cache operations

@functools.lru_cache(maxsize=None)
def _extend_last(extend_fn: Callable):
    """jit(model.extend_fn) for a batch of one, returning only the last position's final hidden state [d]; the cache
    is donated, so a step updates it in place instead of copying every layer's keys and values."""

    def run(params, ids, mask, cache):
        out, cache = extend_fn(params, ids, mask, cache, False)
        return out.last_hidden_state[0, -1], cache

    return jax.jit(run, donate_argnums=(3,))


def rollback(cache: core.KVCache, length: int) -> core.KVCache:
    """Forget every slot from `length` on: positions there become -1 (never attended), so the next `extend` overwrites
    them and continues from the last kept position."""
    slots = jnp.arange(cache.max_length)
    return dataclasses.replace(cache, positions=jnp.where(slots[None] < length, cache.positions, -1),
                               length=jnp.asarray(length, jnp.int32))


def grow(cache: core.KVCache, max_length: int) -> core.KVCache:
    """The same cache with `max_length` slots (new ones empty): one recompile per doubling, no fixed limit."""
    extra = max_length - cache.max_length
    pad = [(0, 0)] * cache.k.ndim
    pad[2] = (0, extra)
    return dataclasses.replace(cache, k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad),
                               positions=jnp.pad(cache.positions, ((0, 0), (0, extra)), constant_values=-1))


class DecoderState:
    """One sequence's KV cache on one decoder, and the hidden state of its last token."""

    def __init__(self, model: LoadedModel, capacity: int):
        self.model = model
        self.cache = model.init_cache_fn(1, bucket(capacity))
        self.hidden = None
        self.slots = 0    # cache slots written (host copy of cache.length: no device sync per step)
        self.padding = 0  # left-padding slots in front of the first real token
        self._extend = _extend_last(model.extend_fn)

    @property
    def num_tokens(self) -> int:
        return self.slots - self.padding

    def prefill(self, ids: Sequence[int]) -> None:
        """Run the first tokens, left-padded to a bucket so prompt lengths share compilations."""
        if not ids:
            raise LinalignError(f"{self.model.spec}: nothing to prefill (the prompt encodes to zero tokens)")
        width = bucket(len(ids))
        self.padding = width - len(ids)
        self._run(np.full((1, width), self.model.pad_token_id, np.int32), self.padding, ids)

    def append(self, token_id: int) -> None:
        self._run(np.zeros((1, 1), np.int32), 0, [token_id])

    def truncate(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` real tokens. `hidden` is stale until the next `append`."""
        self.slots = self.padding + num_tokens
        self.cache = rollback(self.cache, self.slots)

    def _run(self, buffer: np.ndarray, padding: int, ids: Sequence[int]) -> None:
        width = buffer.shape[1]
        if self.slots + width > self.cache.max_length:
            self.cache = grow(self.cache, bucket(self.slots + width))
        buffer[0, padding:] = ids
        mask = (np.arange(width) >= padding).astype(np.int32)[None]
        self.hidden, self.cache = self._extend(self.model.params, buffer, mask, self.cache)
        self.slots += width


# ----------------------------------------------------------------------------------------------- the decode loop

@dataclasses.dataclass
class GenerationResult:
    prompt: str
    text: str                      # the continuation (stop string excluded)
    token_ids: List[int]           # emitted head-vocabulary ids (EOS excluded)
    finish_reason: str             # "eos" | "stop" | "length"
    logits: Optional[np.ndarray] = None   # [steps, V] float32 when record_logits
    stats: dict = dataclasses.field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def _picker(head_fn: Callable, sampling: SamplingConfig, mapped: bool):
    """jit: hidden [d] (→ affine map) → head logits [V] (→ UTF-8 continuation mask) → token.

    Returns (token, logits as sampled from: masked, before temperature)."""

    def pick(head_params, affine, hidden, key, continuation, needed):
        if mapped:
            hidden = hidden @ affine.W + affine.b
        logits = head_fn(head_params, hidden[None])[0].astype(jnp.float32)
        if continuation is not None:
            logits = mask_logits(logits, tokenizer_compat.continuation_mask(continuation, needed))
        return sample_logits(logits, key, sampling), logits

    return jax.jit(pick)


def decode_loop(body, head: LoadedModel, prompt: str, *, max_new_tokens: int,
                sampling: SamplingConfig = SamplingConfig(), key: Optional[jax.Array] = None,
                stop_strings: Sequence[str] = (), eos_ids: Optional[Sequence[int]] = None, affine=None,
                byte_table: Optional[Sequence[bytes]] = None,
                continuation: Optional[tokenizer_compat.ContinuationTable] = None,
                record_logits: bool = False) -> GenerationResult:
    """Pick `max_new_tokens` tokens with `head` from `body.hidden` (mapped by `affine` when given), feeding each back.

    continuation: when given, tokens that would leave invalid UTF-8 are masked (needed by hybrid decoding, where the
    body cannot see a half character).
    """
    check_max_new_tokens(max_new_tokens)
    if not sampling.greedy and key is None:
        raise LinalignError("sampling with temperature > 0 needs an explicit PRNG key (jax.random.key(seed))")
    if any(not s for s in stop_strings):
        raise LinalignError(f"stop strings must be non-empty, got {list(stop_strings)!r}")
    if byte_table is None:
        byte_table = tokenizer_compat.token_byte_table(head.tokenizer, head.config.vocab_size)
    eos = set(default_eos_ids(head.tokenizer) if eos_ids is None else eos_ids)
    pick = _picker(head.lm_head_fn, sampling, affine is not None)
    key = jax.random.key(0) if key is None else key
    stream = tokenizer_compat.Utf8Stream()
    text, emitted, all_logits = "", [], []
    finish = "length"
    longest_stop = max((len(s) for s in stop_strings), default=0)
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token, logits = pick(head.params, affine, body.hidden, sub, continuation, stream.needed)
        token = int(token)
        if record_logits:
            all_logits.append(np.asarray(logits))
        if token in eos:
            finish = "eos"
            break
        emitted.append(token)
        piece = stream.push(byte_table[token])
        search_from = max(0, len(text) - longest_stop + 1)
        text += piece
        hit = min((i for i in (text.find(s, search_from) for s in stop_strings) if i >= 0), default=-1)
        if hit >= 0:
            text, finish = text[:hit], "stop"
            break
        if step + 1 < max_new_tokens:
            body.advance(token, piece)
    if finish == "length":
        text += stream.flush()
    stats = dict(body.stats, steps=step + 1, decode_seconds=time.perf_counter() - start,
                 decode_cpu_seconds=time.process_time() - cpu_start)
    return GenerationResult(prompt=prompt, text=text, token_ids=emitted, finish_reason=finish,
                            logits=np.stack(all_logits) if record_logits else None, stats=stats)


class NativeBody:
    """A decoder continuing its own sequence: the emitted token goes straight into its cache."""

    def __init__(self, model: LoadedModel, prompt: str, max_new_tokens: int):
        ids = model.tokenizer.encode(prompt, add_special_tokens=True).ids
        self.state = DecoderState(model, bucket(len(ids)) + max_new_tokens)
        self.state.prefill(ids)
        self.stats = {"prompt_tokens": len(ids)}

    @property
    def hidden(self):
        return self.state.hidden

    def advance(self, token: int, piece: str) -> None:
        self.state.append(token)


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise LinalignError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str) or not prompt:
        raise LinalignError(f"prompt must be a non-empty string, got {prompt!r}")


def generate(model: LoadedModel, prompt: str, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             key: Optional[jax.Array] = None, stop_strings: Sequence[str] = (), eos_ids: Optional[Sequence[int]] = None,
             record_logits: bool = False) -> GenerationResult:
    """Continue `prompt` with the model itself (the native baseline hybrid decoding is compared to)."""
    check_decoder(model)
    check_prompt(prompt)
    check_max_new_tokens(max_new_tokens)
    body = NativeBody(model, prompt, max_new_tokens)
    return decode_loop(body, model, prompt, max_new_tokens=max_new_tokens, sampling=sampling, key=key,
                       stop_strings=stop_strings, eos_ids=eos_ids, record_logits=record_logits)
