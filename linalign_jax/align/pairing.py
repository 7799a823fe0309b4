"""Token-level pairing for generation maps (paper App. B.5), tokenizer-agnostic via character offsets.

For each target token i with character end offset e_t[i], the paired source token is the earliest source token whose
end offset is at or past it: j(i) = min { k : e_s[k] ≥ e_t[i] }. Offsets of one text are non-decreasing, so this is a
sorted search. Tokens with no such source token (the source text ended earlier) or masked out (padding, special tokens)
get index -1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax.errors import LinalignError


@jax.jit
def pair_token_offsets(target_ends, source_ends, target_mask, source_mask):
    """Batched pairing. target_ends [B, T], source_ends [B, S] int; masks (1 = real token) of the same shapes.

    Returns source indices [B, T] int32, -1 where unpaired.
    """
    # A masked source token takes the end of the real token before it (or -1), which keeps the row sorted and, on a
    # tie, puts the real token first, so a left search never lands on a masked one.
    real = source_mask.astype(bool)
    ends = jax.lax.cummax(jnp.where(real, source_ends.astype(jnp.int32), -1), axis=1)
    idx = jax.vmap(lambda e, q: jnp.searchsorted(e, q, side="left"))(ends, target_ends.astype(jnp.int32))
    safe = jnp.minimum(idx, ends.shape[1] - 1)
    valid = (idx < ends.shape[1]) & jnp.take_along_axis(real, safe, axis=1) & target_mask.astype(bool)
    return jnp.where(valid, safe, -1).astype(jnp.int32)


def pair_tokens(target_ends: np.ndarray, source_ends: np.ndarray) -> np.ndarray:
    """Single-text pairing on 1-D offset arrays (all tokens real); -1 where unpaired."""
    target_ends, source_ends = np.asarray(target_ends), np.asarray(source_ends)
    if target_ends.ndim != 1 or source_ends.ndim != 1:
        raise LinalignError(f"offset arrays must be 1-D, got {target_ends.shape} and {source_ends.shape}")
    if source_ends.size == 0:
        return np.full(target_ends.shape, -1, np.int32)
    if np.any(np.diff(source_ends) < 0):
        raise LinalignError("source end offsets must be non-decreasing (one text, in token order)")
    out = pair_token_offsets(target_ends[None], source_ends[None], np.ones((1, target_ends.size), np.int32),
                             np.ones((1, source_ends.size), np.int32))
    return np.asarray(out[0])


def gather_pairs(target_states: np.ndarray, source_states: np.ndarray, pairs: np.ndarray):
    """Paired rows (source [M, ds], target [M, dt]) from per-token states [B, T, dt], [B, S, ds] and `pairs` [B, T]."""
    b, t = np.nonzero(pairs >= 0)
    return source_states[b, pairs[b, t]], target_states[b, t]
