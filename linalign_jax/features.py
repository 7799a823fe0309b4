"""Hidden-state extraction: texts -> pooled float32 features (or per-token states), and an on-disk feature cache.

Extraction tokenizes with the model's own tokenizer (its special tokens, truncation at `max_length` counted and
logged), sorts texts by length so each batch pads little, pads every batch to a power-of-two length bucket (>= 16,
so a run compiles a handful of shapes) and to a fixed row count that divides the mesh's "data" axis, and runs one
jitted forward + pooling per batch with the rows sharded over all local devices. The next batch is dispatched before
the previous one is copied back, so the host tokenizes and gathers while the device computes.

Pooling (all over the real tokens only, whatever the padding side):
    mean    average of the token states
    last    the last real token (what decoders use: it has seen the whole text)
    cls     the first token ([CLS] for BERT-style encoders)
    tokens  every token's state, with its character span in the text (token-level map fitting)
`layer=-1` is the final hidden state after the final norm (what the paper aligns); any other index selects
`hidden_states[layer]` (0 = embeddings, i = output of layer i, before a final norm). `layer="all"` keeps every
hidden state of one forward pass, pooled: an array [L + 1, N, d] (index = the `hidden_states` index), cached like any
other entry — one extraction feeds a whole layer sweep.

Embedding models' own conventions (models/conventions.py: an instruction prompt, an appended EOS, a padding side)
are applied to every text; the prompt as applied and the EOS are part of the cache key.

The cache (`cached_features`) keys an entry by everything that determines it: the model's weight fingerprint, the
dataset fingerprint, pooling, layer, max_length, normalize (and the prompt / EOS where a model has them). Each entry is `<key>.npy` plus `<key>.json` (shape,
key fields, sha256 of the .npy, truncated count, timing); the JSON is written last, so it marks a complete entry, and
an entry whose array fails its checksum or shape is logged and recomputed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax.distributed import data_size, local_mesh, round_up, row_sharding, shard_params
from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import Progress, atomic_path, atomic_write_json, cache_root, sha256_bytes, sha256_file
from linalign_jax.models.base import LoadedModel
from linalign_jax.shapes import MIN_SEQUENCE, bucket

log = logging.getLogger(__name__)

POOLINGS = ("mean", "last", "cls", "tokens")
CACHE_FORMAT = 1  # bump when the meaning of a cached array changes


# The project's extraction defaults, used where neither the caller nor the model's own metadata says otherwise.
PROJECT_DEFAULTS = {"pooling": "mean", "max_length": 128, "normalize": True}


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    """How texts become pooled features, and where they are cached: THE defaults of every binary's extraction flags
    (`cli.define_extraction_flags`). All but `batch_size` and `cache_dir` are part of the feature-cache key.

    pooling / max_length / normalize None = unset: `cache_kwargs(model)` takes the model's conventions
    (sentence-transformers metadata, documented instruction formats: models/conventions.py), then PROJECT_DEFAULTS.
    instruction None = the model's documented default task (if it has an instruction format), "" = no prompt.
    """

    pooling: Optional[str] = None
    layer: int = -1
    max_length: Optional[int] = None
    normalize: Optional[bool] = None
    batch_size: int = 64
    cache_dir: Optional[str] = None
    instruction: Optional[str] = None

    def cache_kwargs(self, model: Optional[LoadedModel] = None) -> Dict[str, Any]:
        """Keyword arguments of `cached_features`, unset fields resolved for `model` (None: project defaults)."""
        kwargs = dataclasses.asdict(self)
        own = getattr(model, "conventions", None)
        for name, default in PROJECT_DEFAULTS.items():
            if kwargs[name] is None:
                kwargs[name] = getattr(own, name, None)
                kwargs[name] = default if kwargs[name] is None else kwargs[name]
        return kwargs


@dataclasses.dataclass
class FeatureSet:
    """Pooled features: `array` float32 [N, d] (or [L + 1, N, d] for layer="all"), row i for text i, and the metadata
    that produced it."""

    array: np.ndarray
    metadata: Dict[str, Any]


@dataclasses.dataclass
class TokenFeatures:
    """Per-token states for pooling="tokens": per text, states [n_i, d] float32, token ids [n_i], character spans
    [n_i, 2] (start, end) into the text, and a special-token mask [n_i] (True for [CLS], BOS, ...)."""

    states: List[np.ndarray]
    token_ids: List[np.ndarray]
    offsets: List[np.ndarray]
    special: List[np.ndarray]
    metadata: Dict[str, Any]


# ---------------------------------------------------------------------------------------------------- pooling

def pool(hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """[B, T, d] states -> [B, d] float32 over the real tokens (mask 1); correct for left or right padding.

    A row without real tokens (a batch-filler row) gives finite values, never NaN.
    """
    hidden = hidden.astype(jnp.float32)
    mask = attention_mask.astype(jnp.float32)
    if pooling == "mean":
        return jnp.einsum("btd,bt->bd", hidden, mask) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
    positions = jnp.arange(hidden.shape[1])
    if pooling == "last":
        index = jnp.max(jnp.where(mask > 0, positions, 0), axis=-1)
    elif pooling == "cls":
        index = jnp.min(jnp.where(mask > 0, positions, hidden.shape[1] - 1), axis=-1)
    else:
        raise LinalignError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=64)
def pooled_forward(forward_fn, pooling: str, layer: int, normalize: bool):
    """The jitted batch function (params, ids, mask) -> features for one model and setting; jax.jit then keeps one
    executable per batch shape."""

    def step(params, input_ids, attention_mask):
        out = forward_fn(params, input_ids, attention_mask, layer != -1)
        if layer == "all":
            if pooling == "tokens":
                raise LinalignError("layer='all' keeps pooled states only; pool them (mean / last / cls)")
            pooled = jnp.stack([pool(h, attention_mask, pooling) for h in out.hidden_states])  # [L + 1, B, d]
            return l2_normalize(pooled) if normalize else pooled
        hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        if pooling == "tokens":
            return hidden.astype(jnp.float32)
        pooled = pool(hidden, attention_mask, pooling)
        return l2_normalize(pooled) if normalize else pooled

    return jax.jit(step)


# ------------------------------------------------------------------------------------------------- tokenizing

@dataclasses.dataclass
class Tokenized:
    ids: List[np.ndarray]
    offsets: List[np.ndarray]
    special: List[np.ndarray]
    truncated: np.ndarray  # bool [N]


@contextlib.contextmanager
def _plain_tokenizer(tokenizer, max_length: int) -> Iterator[Any]:
    """The tokenizer set to truncate at max_length without padding; its own settings are restored afterwards."""
    padding, truncation = tokenizer.padding, tokenizer.truncation
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    try:
        yield tokenizer
    finally:
        tokenizer.no_truncation()
        if truncation:
            tokenizer.enable_truncation(**truncation)
        if padding:
            tokenizer.enable_padding(**padding)


def tokenize(tokenizer, texts: Sequence[str], max_length: int, eos_id: Optional[int] = None) -> Tokenized:
    """Token ids (with the tokenizer's special tokens), char spans and truncation flags, one entry per text.

    eos_id: every text's ids end with it (appended after truncating to max_length - 1, unless the tokenizer already
    put it last), as e5-mistral and Qwen3-Embedding are run; the appended token spans no characters."""
    with _plain_tokenizer(tokenizer, max_length) as tok:
        encodings = tok.encode_batch(list(texts))
    empty = [i for i, e in enumerate(encodings) if not e.ids]
    if empty:
        raise LinalignError(f"{len(empty)} texts give no tokens at all (e.g. index {empty[0]}: {texts[empty[0]]!r}); "
                            "remove them or use a tokenizer that adds special tokens")
    tokens = Tokenized(ids=[np.asarray(e.ids, np.int32) for e in encodings],
                       offsets=[np.asarray(e.offsets, np.int32).reshape(-1, 2) for e in encodings],
                       special=[np.asarray(e.special_tokens_mask, bool) for e in encodings],
                       truncated=np.asarray([bool(e.overflowing) for e in encodings]))
    if eos_id is not None:
        for i, (text, ids) in enumerate(zip(texts, tokens.ids)):
            if ids[-1] != eos_id:
                keep = min(len(ids), max_length - 1)
                tokens.ids[i] = np.append(ids[:keep], np.int32(eos_id))
                tokens.offsets[i] = np.concatenate([tokens.offsets[i][:keep], [[len(text), len(text)]]]).astype(np.int32)
                tokens.special[i] = np.append(tokens.special[i][:keep], True)
                tokens.truncated[i] |= keep < len(ids)
    return tokens


def num_states(model: LoadedModel) -> int:
    """len(hidden_states) of the model (embeddings + layers), from shapes only."""
    ids = jax.ShapeDtypeStruct((1, MIN_SEQUENCE), jnp.int32)
    out = jax.eval_shape(lambda p, i, m: model.forward(p, i, m, True), model.params, ids, ids)
    return len(out.hidden_states)


# ------------------------------------------------------------------------------------------------- extraction

def extract_features(model: LoadedModel, texts: Sequence[str], *, pooling: str = "mean", layer: int = -1,
                     max_length: int = 128, batch_size: int = 64, normalize: bool = False, progress: bool = True,
                     padding_side: Optional[str] = None, instruction: Optional[str] = None,
                     mesh=None) -> Union[FeatureSet, TokenFeatures]:
    """Features of `texts` from `model` (see the module docstring); `mesh` defaults to all local devices.

    The model's conventions (`model.conventions`) put each text in its prompt (instruction: None = the documented
    default task, "" = the bare text) and append its EOS token where documented; padding_side None = the model's
    (else "right"). Token features' character spans then index the prompted text."""
    texts = _check_texts(texts)
    conventions = model.conventions
    padding_side = padding_side or conventions.padding_side or "right"
    texts = [conventions.format(t, instruction) for t in texts]
    if pooling not in POOLINGS:
        raise LinalignError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    if pooling == "tokens" and normalize:
        raise LinalignError("normalize applies to pooled features, not to pooling='tokens'")
    for name, value in (("max_length", max_length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LinalignError(f"{name} must be a positive int, got {value!r}")
    if padding_side not in ("right", "left"):
        raise LinalignError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    n_states = num_states(model)
    if layer == "all" and pooling == "tokens":
        raise LinalignError("layer='all' keeps pooled states only; use pooling mean, last or cls")
    if layer != "all" and (isinstance(layer, bool) or not isinstance(layer, int) or not -n_states <= layer < n_states):
        raise LinalignError(f"layer {layer!r} out of range for {model.spec}: it has {n_states} hidden states "
                            f"(embeddings + {n_states - 1} layers); expected an int in [{-n_states}, {n_states - 1}] "
                            "or 'all'")

    start = time.perf_counter()
    cpu_start = time.process_time()
    tokens = tokenize(model.tokenizer, texts, max_length, conventions.eos_token_id if conventions.append_eos else None)
    n_truncated = int(tokens.truncated.sum())
    if n_truncated:
        log.warning("%s: %d of %d texts exceed max_length=%d tokens and were truncated", model.spec, n_truncated,
                    len(texts), max_length)
    mesh = mesh if mesh is not None else local_mesh()
    rows = round_up(min(batch_size, len(texts)), data_size(mesh))
    batch_sharding = row_sharding(mesh)
    params = shard_params(model.params, mesh)
    step = pooled_forward(model.forward_fn, pooling, layer, normalize)

    lengths = np.asarray([len(ids) for ids in tokens.ids])
    order = np.argsort(-lengths, kind="stable")  # longest first: the largest shape compiles (or fails) first
    bar = Progress(f"extract {model.spec} ({pooling})", total=len(texts), unit="tokens") if progress else None
    results: List[Tuple[np.ndarray, Any]] = []
    shapes = set()
    pending = None
    for begin in range(0, len(texts), rows):
        index = order[begin:begin + rows]
        width = bucket(int(lengths[index].max()), MIN_SEQUENCE, max_length)
        shapes.add((rows, width))
        ids, mask = _pad_batch([tokens.ids[i] for i in index], rows, width, model.pad_token_id, padding_side)
        out = step(params, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
        if pending is not None:
            results.append(_fetch(pending, bar))
        pending = (index, out, mask)
    results.append(_fetch(pending, bar))
    seconds = time.perf_counter() - start
    if bar:
        bar.close()

    n_tokens = int(lengths.sum())
    metadata = {
        "model_spec": model.spec, "model_fingerprint": model.fingerprint, "family": model.family,
        "dtype": model.dtype, "pooling": pooling, "layer": layer, "max_length": max_length, "normalize": normalize,
        **prompt_key(model, instruction), "padding_side": padding_side,
        "n_texts": len(texts), "hidden_size": model.hidden_size, "truncated": n_truncated, "tokens": n_tokens,
        "seconds": seconds, "cpu_seconds": time.process_time() - cpu_start, "tokens_per_second": n_tokens / seconds,
        "devices": int(mesh.devices.size), "batch_rows": rows, "shapes": sorted(shapes),
    }
    if pooling == "tokens":
        states: List[Optional[np.ndarray]] = [None] * len(texts)
        for index, out, mask in results:
            for row, i in enumerate(index):
                states[i] = out[row][mask[row] > 0]
        return TokenFeatures(states=states, token_ids=tokens.ids, offsets=tokens.offsets, special=tokens.special,
                             metadata=metadata)
    lead = results[0][1].shape[:-2]  # (L + 1,) for layer="all", else ()
    array = np.empty((*lead, len(texts), results[0][1].shape[-1]), np.float32)
    for index, out, _ in results:
        array[..., index, :] = out[..., :len(index), :]
    if not np.isfinite(array).all():
        raise LinalignError(f"{model.spec}: non-finite features (overflow in {model.dtype}?)")
    return FeatureSet(array=array, metadata=metadata)


def _check_texts(texts) -> List[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise LinalignError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise LinalignError("texts is empty: nothing to extract")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise LinalignError(f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, expected str "
                            f"({len(bad)} non-strings)")
    return list(texts)


def _pad_batch(seqs: List[np.ndarray], rows: int, width: int, pad_id: int,
               side: str) -> Tuple[np.ndarray, np.ndarray]:
    """ids/mask [rows, width] int32; rows beyond len(seqs) are all padding (mask 0)."""
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for r, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[r, span], mask[r, span] = seq, 1
    return ids, mask


def _fetch(pending, bar: Optional[Progress]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    index, out, mask = pending
    out = np.asarray(out)  # blocks until this batch is done
    if bar:
        bar.update(len(index), units=int(mask.sum()))
    return index, out, mask


# ------------------------------------------------------------------------------------------------------ cache

def cache_key(model_fingerprint: str, data_fingerprint: str, pooling: str, layer: int, max_length: int,
              normalize: bool, prompt: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {"format": CACHE_FORMAT, "model_fingerprint": model_fingerprint, "data_fingerprint": data_fingerprint,
            "pooling": pooling, "layer": layer, "max_length": max_length, "normalize": normalize, **(prompt or {})}


def prompt_key(model: LoadedModel, instruction: Optional[str]) -> Dict[str, Any]:
    """What the model's conventions change in the tokens: the prompt as applied and the appended EOS (empty for a
    model without conventions, so its cache keys are the same as before conventions existed)."""
    conventions = model.conventions
    key: Dict[str, Any] = {}
    template = conventions.format("{text}", instruction)
    if template != "{text}":
        key["prompt"] = template
    if conventions.append_eos:
        key["append_eos"] = conventions.eos_token_id
    return key


def default_cache_dir() -> Path:
    return cache_root() / "features"


def cached_features(model: LoadedModel, texts, data_fingerprint: str, *, pooling: str = "mean", layer: int = -1,
                    max_length: int = 128, normalize: bool = False, batch_size: int = 64,
                    cache_dir: Optional[os.PathLike] = None, progress: bool = True, instruction: Optional[str] = None,
                    mesh=None) -> FeatureSet:
    """`extract_features` through the on-disk cache. `texts` is a list of strings or a dataset with a "text" column;
    `data_fingerprint` must identify exactly these texts (e.g. `linalign_jax.data.fingerprint`)."""
    if pooling == "tokens":
        raise LinalignError("cached_features stores pooled features; call extract_features for pooling='tokens'")
    if not isinstance(data_fingerprint, str) or not data_fingerprint:
        raise LinalignError(f"data_fingerprint must be a non-empty string, got {data_fingerprint!r}")
    if not isinstance(texts, (list, tuple)) and hasattr(texts, "column_names"):
        texts = list(texts["text"])
    key = cache_key(model.fingerprint, data_fingerprint, pooling, layer, max_length, normalize,
                    prompt_key(model, instruction))
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode())
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    array_path, meta_path = root / f"{digest}.npy", root / f"{digest}.json"
    lookup_start = time.perf_counter()
    hit = _read_entry(array_path, meta_path, key)
    if hit is not None:
        hit.metadata["load_seconds"] = time.perf_counter() - lookup_start
        if hit.array.shape[-2] != len(texts):
            raise LinalignError(f"feature cache entry {array_path} holds {hit.array.shape[-2]} rows but {len(texts)} "
                                f"texts were given: data_fingerprint {data_fingerprint!r} does not identify them")
        return hit
    features = extract_features(model, texts, pooling=pooling, layer=layer, max_length=max_length,
                                batch_size=batch_size, normalize=normalize, progress=progress,
                                instruction=instruction, mesh=mesh)
    with atomic_path(array_path) as tmp:
        np.save(tmp, features.array, allow_pickle=False)
    metadata = {**features.metadata, "key": key, "data_fingerprint": data_fingerprint,
                "shape": list(features.array.shape), "sha256": sha256_file(array_path), "created": time.time()}
    atomic_write_json(meta_path, metadata)
    return FeatureSet(features.array, {**metadata, "cache": "miss", "cache_path": str(array_path)})


def _read_entry(array_path: Path, meta_path: Path, key: Dict[str, Any]) -> Optional[FeatureSet]:
    """The cached FeatureSet, or None if absent; a damaged entry is logged and reported absent (then rewritten)."""
    if not meta_path.exists():
        return None
    try:
        metadata = json.loads(meta_path.read_text())
        if metadata.get("key") != key:
            raise ValueError(f"metadata key {metadata.get('key')} differs from {key}")
        digest = sha256_file(array_path)
        if digest != metadata["sha256"]:
            raise ValueError(f"sha256 {digest[:12]}... differs from the recorded {metadata['sha256'][:12]}...")
        array = np.load(array_path, allow_pickle=False)
        if list(array.shape) != metadata["shape"] or array.dtype != np.float32:
            raise ValueError(f"array {array.dtype}{list(array.shape)} differs from float32{metadata['shape']}")
    except (OSError, ValueError, KeyError) as e:
        log.warning("corrupt feature cache entry %s (%s); recomputing", array_path, e)
        return None
    return FeatureSet(array, {**metadata, "cache": "hit", "cache_path": str(array_path)})
