"""Batched incremental decoding on a decoder's KV cache (layout in `linalign_jax.models.core`).

Many prompts decode together. A batch of B rows shares one cache of S slots and one write index; each row owns its
slots' *position ids* (-1 = never attended), so rows are independent: a row that is done, or that has nothing new to
read this step, writes a masked slot (a hole), and a row is rolled back by forgetting its positions from some point
on (`CacheRows.truncate`), whatever the other rows do. Holes are squeezed out by `compact` when the slots run out.
Attention masks by positions and RoPE uses them, so holes and left padding change no real token's state: greedy
decoding of a prompt in a batch gives the tokens it gets alone (tested, also on the real models).

The device work per step is a few jitted calls with static shapes: `core.extend_layerwise` of one token per row
(one program per layer over per-layer weights: see there why), then head + token choice for all rows. Prompts are left-padded to a power-of-two bucket and caches sized once per batch, so a run compiles a handful
of shapes. The host loop between steps does what needs text, per row: bytes → UTF-8, stop strings, EOS.

`decode_rows` is shared by native and hybrid decoding: a *body* owns the cache rows and exposes the final hidden
states that predict the next tokens; the loop maps them (optionally), applies a head, picks tokens, turns them into
text and hands {row: (token, text)} back to the body to advance. `NativeRows` feeds the tokens themselves; the
hybrid body (`linalign_jax.generate.hybrid`) feeds the text to another model.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax import tokenizer_compat
from linalign_jax.errors import LinalignError
from linalign_jax.generate.sampling import SamplingConfig, mask_logits, sample_logits
from linalign_jax.models import core
from linalign_jax.models.base import LoadedModel
from linalign_jax.shapes import MIN_SEQUENCE, bucket

DEFAULT_BATCH_SIZE = 8
# End-of-sequence markers of the families we load; used when the caller gives no eos ids.
EOS_TOKENS = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")


def default_eos_ids(tokenizer) -> tuple:
    """Ids of the special tokens in `EOS_TOKENS` that this tokenizer defines."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return tuple(sorted(vocab[t] for t in EOS_TOKENS if t in vocab))


def check_decoder(model: LoadedModel, role: str = "model") -> None:
    if not model.is_decoder or model.extend_fn is None or model.lm_head_fn is None:
        raise LinalignError(f"{role} {model.spec!r} ({model.family}) is not a decoder; generation needs a causal LM")


# ------------------------------------------------------------------------------------------ the decoding programs

_UNSTACKED: Dict[int, tuple] = {}


def decoding_params(model: LoadedModel):
    """`core.unstack_layers(model.params)`, made once per model: one more copy of the layer weights lives as long
    as the model does."""
    entry = _UNSTACKED.get(id(model))
    if entry is None or entry[0]() is not model:
        entry = (weakref.ref(model), core.unstack_layers(model.params))
        _UNSTACKED[id(model)] = entry
        weakref.finalize(model, _UNSTACKED.pop, id(model), None)
    return entry[1]


@jax.jit
def _last_state(hidden, mask, previous):
    """The last state of rows that read a real token this step; the others keep theirs."""
    return jnp.where(mask[:, -1:] > 0, hidden[:, -1], previous)


@functools.partial(jax.jit, donate_argnums=(0,))
def _truncate(positions, keep):
    """Row r forgets every position >= keep[r]."""
    return jnp.where(positions < keep[:, None], positions, -1)


@functools.partial(jax.jit, donate_argnums=(0,))
def compact(cache: core.KVCache) -> core.KVCache:
    """Each row's live slots moved to the front, in order; the write index becomes the longest row's count."""
    order = jnp.argsort(cache.positions < 0, axis=1, stable=True)
    take = lambda a: jnp.take_along_axis(a, order[:, :, None, None], axis=1)  # noqa: E731
    return core.KVCache(k=tuple(map(take, cache.k)), v=tuple(map(take, cache.v)),
                        positions=jnp.take_along_axis(cache.positions, order, axis=1),
                        length=jnp.max(jnp.sum(cache.positions >= 0, axis=1)).astype(jnp.int32))


def grow(cache: core.KVCache, max_length: int) -> core.KVCache:
    """The same cache with `max_length` slots (new ones empty): a recompile, only when compaction is not enough."""
    extra = max_length - cache.max_length
    pad = lambda a: jnp.pad(a, ((0, 0), (0, extra), (0, 0), (0, 0)))  # noqa: E731
    return dataclasses.replace(cache, k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)),
                               positions=jnp.pad(cache.positions, ((0, 0), (0, extra)), constant_values=-1))


class CacheRows:
    """B rows of token sequences on one decoder's KV cache, each with the hidden state of its last token.

    Host mirrors (`counts`: real tokens per row, `used`: slots written) mean no device sync per step."""

    def __init__(self, model: LoadedModel, batch_size: int, capacity: int):
        check_decoder(model)
        self.model = model
        self.rest, self.layers = decoding_params(model)
        self.cache = core.init_cache(model.config, batch_size, bucket(capacity, MIN_SEQUENCE), per_layer=True)
        self.hidden = jnp.zeros((batch_size, model.hidden_size), model.config.compute_dtype)
        self.counts = np.zeros(batch_size, np.int64)
        self.used = 0

    @property
    def batch_size(self) -> int:
        return len(self.counts)

    def prefill(self, rows: Sequence[Sequence[int]]) -> None:
        """The first tokens of every row (an empty row is a filler), left-padded to one bucket."""
        if len(rows) != self.batch_size:
            raise LinalignError(f"prefill needs {self.batch_size} rows, got {len(rows)}")
        width = bucket(max(len(r) for r in rows), MIN_SEQUENCE)
        ids = np.full((self.batch_size, width), self.model.pad_token_id, np.int32)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        self._run(ids, mask)

    def feed(self, tokens: Dict[int, int]) -> None:
        """One slot for every row: rows in `tokens` read their token, the others keep their state."""
        ids = np.zeros((self.batch_size, 1), np.int32)
        mask = np.zeros_like(ids)
        for row, token in tokens.items():
            ids[row, 0], mask[row, 0] = token, 1
        self._run(ids, mask)

    def feed_queues(self, queues: Dict[int, Sequence[int]]) -> None:
        """Each row reads its queue of tokens, one token per step (rows with shorter queues wait masked)."""
        depth = max((len(q) for q in queues.values()), default=0)
        for i in range(depth):
            self.feed({row: q[i] for row, q in queues.items() if i < len(q)})

    def truncate(self, keep: Dict[int, int]) -> None:
        """Row r keeps its first keep[r] tokens; its hidden state is stale until it reads a token."""
        lengths = np.full(self.batch_size, np.iinfo(np.int32).max, np.int32)
        for row, n in keep.items():
            lengths[row] = n
            self.counts[row] = n
        self.cache = dataclasses.replace(self.cache, positions=_truncate(self.cache.positions, lengths))

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> None:
        width = ids.shape[1]
        if self.used + width > self.cache.max_length:
            self.cache = compact(self.cache)
            self.used = int(self.counts.max())
            if self.used + width > self.cache.max_length:
                self.cache = grow(self.cache, bucket(self.used + width, MIN_SEQUENCE))
        states, self.cache = core.extend_layerwise(self.model.config, self.rest, self.layers, ids, mask, self.cache)
        self.hidden = _last_state(states, mask, self.hidden)
        self.used += width
        self.counts += mask.sum(axis=1)


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
def _picker(head_fn: Callable, sampling: SamplingConfig, mapped: bool, masked: bool):
    """jit: hidden [B, d] (→ affine map) → head logits [B, V] (→ UTF-8 continuation mask) → tokens [B].

    Row r samples with fold_in(keys[r], step), so its draws do not depend on the batch it is in.
    Returns (tokens, logits as sampled from: masked, before temperature)."""

    def pick(head_params, affine, hidden, keys, step, continuation, needed):
        if mapped:
            hidden = hidden @ affine.W + affine.b
        logits = head_fn(head_params, hidden).astype(jnp.float32)
        if masked:
            logits = mask_logits(logits, jax.vmap(lambda n: tokenizer_compat.continuation_mask(continuation, n))(
                needed))
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        tokens = jax.vmap(lambda row, k: sample_logits(row, k, sampling))(logits, step_keys)
        return tokens, logits

    return jax.jit(pick)


StopAt = Callable[[str], int]   # continuation text -> index where it ends (a stop was found there), or -1


def stop_index(text: str, search_from: int, stop_strings: Sequence[str], stop_at: Optional[StopAt]) -> int:
    """Where the continuation `text` stops (cut there), or -1: the first stop string found from `search_from`
    (the caller passes a start that cannot miss one spanning the newest piece), else `stop_at(text)`."""
    hit = min((i for i in (text.find(s, search_from) for s in stop_strings) if i >= 0), default=-1)
    if stop_at is not None:
        at = stop_at(text)
        if at >= 0 and (hit < 0 or at < hit):
            hit = at
    return hit


def decode_rows(body, head: LoadedModel, prompts: Sequence[str], keys: jax.Array, *, max_new_tokens: int,
                sampling: SamplingConfig, stop_strings: Sequence[str], stop_at: Optional[StopAt], eos: set,
                affine=None, byte_table: Sequence[bytes], continuation=None,
                record_logits: bool = False) -> List[GenerationResult]:
    """Pick up to `max_new_tokens` tokens per row with `head` from `body.hidden` (mapped by `affine` when given),
    feeding each back; rows beyond len(prompts) are fillers. continuation: when given, tokens that would leave
    invalid UTF-8 are masked (hybrid decoding: the body cannot see a half character)."""
    n = len(prompts)
    pick = _picker(head.lm_head_fn, sampling, affine is not None, continuation is not None)
    streams = [tokenizer_compat.Utf8Stream() for _ in range(n)]
    texts, emitted, all_logits = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
    finish, steps = ["length"] * n, [0] * n
    active = set(range(n))
    longest_stop = max((len(s) for s in stop_strings), default=0)
    needed = np.zeros(body.batch_size, np.int32)
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(max_new_tokens):
        for row in active:
            needed[row] = streams[row].needed
        tokens, logits = pick(head.params, affine, body.hidden, keys, step, continuation, needed)
        tokens = np.asarray(tokens)
        logits = np.asarray(logits) if record_logits else None
        advance = {}
        for row in sorted(active):
            token = int(tokens[row])
            steps[row] += 1
            if record_logits:
                all_logits[row].append(logits[row])
            if token in eos:
                finish[row] = "eos"
                continue
            emitted[row].append(token)
            piece = streams[row].push(byte_table[token])
            search_from = max(0, len(texts[row]) - longest_stop + 1)
            texts[row] += piece
            hit = stop_index(texts[row], search_from, stop_strings, stop_at) if piece else -1
            if hit >= 0:
                texts[row], finish[row] = texts[row][:hit], "stop"
            elif step + 1 < max_new_tokens:
                advance[row] = (token, piece)
        active = set(advance)
        if not active:
            break
        body.advance(advance)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    results = []
    for row, prompt in enumerate(prompts):
        if finish[row] == "length":
            texts[row] += streams[row].flush()
        stats = dict(body.stats[row], steps=steps[row], batch_size=body.batch_size, decode_seconds=seconds,
                     decode_cpu_seconds=cpu)
        results.append(GenerationResult(prompt=prompt, text=texts[row], token_ids=emitted[row],
                                        finish_reason=finish[row], stats=stats,
                                        logits=np.stack(all_logits[row]) if record_logits else None))
    return results


class PrefilledRows:
    """The rows of one batch, their prompts prefilled into one cache of `capacity` slots (filler rows pad the batch):
    the bodies `decode_rows` drives (NativeRows here, hybrid.HybridRows) differ only in how they `advance`."""

    def __init__(self, model: LoadedModel, prompt_ids: Sequence[Sequence[int]], batch_size: int, capacity: int):
        self.rows = CacheRows(model, batch_size, capacity)
        start = time.perf_counter()
        self.rows.prefill(list(prompt_ids) + [[]] * (batch_size - len(prompt_ids)))
        seconds = time.perf_counter() - start
        self.stats = [{"prompt_tokens": len(ids), "prefill_seconds": seconds} for ids in prompt_ids]

    @property
    def batch_size(self) -> int:
        return self.rows.batch_size

    @property
    def hidden(self):
        return self.rows.hidden


class NativeRows(PrefilledRows):
    """Decoders continuing their own sequences: the emitted tokens go straight into the cache."""

    def __init__(self, model: LoadedModel, prompt_ids: Sequence[Sequence[int]], batch_size: int,
                 max_new_tokens: int):
        super().__init__(model, prompt_ids, batch_size,
                         bucket(max(map(len, prompt_ids)), MIN_SEQUENCE) + max_new_tokens)

    def advance(self, tokens: Dict[int, tuple]) -> None:
        self.rows.feed({row: token for row, (token, _) in tokens.items()})


# ------------------------------------------------------------------------------------------------- entry points

def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise LinalignError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def check_prompts(prompts: Sequence[str]) -> List[str]:
    if isinstance(prompts, str) or not len(prompts):
        raise LinalignError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt:
            raise LinalignError(f"prompt must be a non-empty string, got {prompt!r}")
    return list(prompts)


def check_decode_options(sampling: SamplingConfig, key, stop_strings: Sequence[str], batch_size) -> None:
    if not sampling.greedy and key is None:
        raise LinalignError("sampling with temperature > 0 needs an explicit PRNG key (jax.random.key(seed))")
    if isinstance(stop_strings, str) or any(not isinstance(s, str) or not s for s in stop_strings):
        raise LinalignError(f"stop strings must be a list of non-empty strings, got {stop_strings!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise LinalignError(f"batch_size must be a positive int, got {batch_size!r}")


def run_batches(prompts: List[str], lengths: Sequence[int], batch_size: int, key: Optional[jax.Array],
                decode_batch: Callable[[List[int], jax.Array], List[GenerationResult]]) -> List[GenerationResult]:
    """Decode prompts `batch_size` at a time, longest first (little padding), results in the prompts' order.

    decode_batch(indices, keys) decodes prompts[indices]; keys[r] = fold_in(key, prompt index), so a prompt's
    samples do not depend on how the prompts are batched."""
    key = jax.random.key(0) if key is None else key
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    size = min(batch_size, len(prompts))
    results: List[Optional[GenerationResult]] = [None] * len(prompts)
    for begin in range(0, len(order), size):
        chunk = order[begin:begin + size]
        index = np.asarray(chunk + [chunk[0]] * (size - len(chunk)), np.uint32)  # fillers reuse a key
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        for i, result in zip(chunk, decode_batch(chunk, keys)):
            results[i] = result
    return results


def generate_batch(model: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int,
                   sampling: SamplingConfig = SamplingConfig(), key: Optional[jax.Array] = None,
                   stop_strings: Sequence[str] = (), stop_at: Optional[StopAt] = None,
                   eos_ids: Optional[Sequence[int]] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                   record_logits: bool = False, add_special_tokens: bool = True) -> List[GenerationResult]:
    """Continue every prompt with the model itself (the native baseline hybrid decoding is compared to),
    `batch_size` prompts at a time. add_special_tokens=False for prompts that already hold them (a rendered chat
    template); stop_at(continuation) -> cut index or -1 ends a row early (e.g. `protocol.answer_stop`)."""
    check_decoder(model)
    prompts = check_prompts(prompts)
    check_max_new_tokens(max_new_tokens)
    check_decode_options(sampling, key, stop_strings, batch_size)
    ids = [model.tokenizer.encode(p, add_special_tokens=add_special_tokens).ids for p in prompts]
    byte_table = tokenizer_compat.token_byte_table(model.tokenizer, model.config.vocab_size)
    eos = set(default_eos_ids(model.tokenizer) if eos_ids is None else eos_ids)

    def decode_batch(chunk, keys):
        body = NativeRows(model, [ids[i] for i in chunk], len(keys), max_new_tokens)
        return decode_rows(body, model, [prompts[i] for i in chunk], keys, max_new_tokens=max_new_tokens,
                           sampling=sampling, stop_strings=stop_strings, stop_at=stop_at, eos=eos,
                           byte_table=byte_table, record_logits=record_logits)

    return run_batches(prompts, [len(i) for i in ids], batch_size, key, decode_batch)


def generate(model: LoadedModel, prompt: str, **kwargs) -> GenerationResult:
    """One prompt (a batch of one) through `generate_batch`."""
    return generate_batch(model, check_prompts([prompt]), batch_size=1, **kwargs)[0]
