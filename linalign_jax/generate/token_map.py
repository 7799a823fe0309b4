"""Token-level map fitting for generation (paper §2.2-2.3, App. B.5): per-token final states of both models over a
corpus, paired by character end offsets, into a streamed float64 ridge (λ = 1e-4 as in the paper).

Texts go through in chunks: each chunk's per-token states are extracted, paired and reduced to float64 sufficient
statistics (`linalign_jax.align.ridge`) before the next chunk is read, so memory holds one chunk's states, never the
corpus's.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from linalign_jax import tokenizer_compat
from linalign_jax.align.maps import AffineMap
from linalign_jax.align.pairing import pair_token_offsets
from linalign_jax.align.ridge import RidgeStats, batch_stats, merge_stats, solve_ridge
from linalign_jax.errors import LinalignError
from linalign_jax.features import TokenFeatures, extract_features
from linalign_jax.generate.decoding import check_decoder
from linalign_jax.io_utils import Progress
from linalign_jax.models.base import LoadedModel
from linalign_jax.shapes import MIN_SEQUENCE, bucket

PAPER_LAMBDA = 1e-4


def paired_states(source: TokenFeatures, target: TokenFeatures) -> Tuple[np.ndarray, np.ndarray]:
    """(source rows [M, ds], target rows [M, dt]): for each real target token, the earliest real source token whose
    character end is at or past it; special tokens (BOS, ...) on either side never pair.

    One batched `pair_token_offsets` call per chunk, on offsets padded to power-of-two widths (few compilations)."""
    s_ends, s_mask = _padded_ends(source)
    t_ends, t_mask = _padded_ends(target)
    pairs = np.asarray(pair_token_offsets(t_ends, s_ends, t_mask, s_mask))
    xs: List[np.ndarray] = []
    ys: List[np.ndarray] = []
    for row, (s_states, t_states) in enumerate(zip(source.states, target.states)):
        n = len(t_states)
        ok = pairs[row, :n] >= 0
        xs.append(s_states[pairs[row, :n][ok]])
        ys.append(t_states[ok])
    return np.concatenate(xs), np.concatenate(ys)


def _padded_ends(features: TokenFeatures) -> Tuple[np.ndarray, np.ndarray]:
    """End offsets [B, W] and real-token masks [B, W] (0 for special tokens and padding)."""
    width = bucket(max(len(o) for o in features.offsets), MIN_SEQUENCE)
    ends = np.zeros((len(features.offsets), width), np.int32)
    mask = np.zeros_like(ends)
    for row, (offsets, special) in enumerate(zip(features.offsets, features.special)):
        ends[row, :len(offsets)] = offsets[:, 1]
        mask[row, :len(offsets)] = ~special
    return ends, mask


def fit_token_maps(model_a: LoadedModel, model_b: LoadedModel, texts: Sequence[str], *, both_directions: bool = False,
                   lam: float | str = PAPER_LAMBDA, chunk_texts: int = 64, max_length: int = 128,
                   batch_size: int = 16) -> List[Tuple[AffineMap, dict]]:
    """Ridge map a → b on token pairs of `texts` (and b → a with `both_directions`: the per-token states are
    extracted once and paired both ways). Returns [(map, metadata ready for `save_map`), ...]."""
    for role, model in (("model A", model_a), ("model B", model_b)):
        check_decoder(model, role)
        tokenizer_compat.as_fast_tokenizer(model.tokenizer, f"{role} tokenizer ({model.spec})")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise LinalignError("fitting a token map needs at least one non-blank text")
    directions = [(0, 1), (1, 0)] if both_directions else [(0, 1)]
    stats: List[Optional[RidgeStats]] = [None] * len(directions)
    progress = Progress("token-map fit", total=len(texts), unit="texts")
    for begin in range(0, len(texts), chunk_texts):
        chunk = list(texts[begin:begin + chunk_texts])
        feats = [extract_features(model, chunk, pooling="tokens", max_length=max_length, batch_size=batch_size,
                                  progress=False) for model in (model_a, model_b)]
        for d, (src, tgt) in enumerate(directions):
            x, y = paired_states(feats[src], feats[tgt])
            shift = (None, None) if stats[d] is None else (stats[d].shift_x, stats[d].shift_y)
            part = batch_stats(x, y, shift_x=shift[0], shift_y=shift[1])
            stats[d] = part if stats[d] is None else merge_stats(stats[d], part)
        progress.update(len(chunk))
    progress.close()
    models = (model_a, model_b)
    fitted = []
    for (src, tgt), total in zip(directions, stats):
        affine, info = solve_ridge(total, lam)
        source, target = models[src], models[tgt]
        fitted.append((affine, {
            **info, "pooling": "tokens", "pairing": "char_end_offsets", "n_pairs": int(total.n),
            "n_texts": len(texts), "max_length": max_length, "source_model": source.spec,
            "target_model": target.spec, "source_fingerprint": source.fingerprint,
            "target_fingerprint": target.fingerprint}))
    return fitted


def fit_token_map(source: LoadedModel, target: LoadedModel, texts: Sequence[str], **kwargs) -> Tuple[AffineMap, dict]:
    """The source → target map of `fit_token_maps`."""
    return fit_token_maps(source, target, texts, **kwargs)[0]
