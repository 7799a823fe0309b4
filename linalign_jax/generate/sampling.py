"""Next-token choice from logits: greedy, temperature and nucleus (top-p) sampling with explicit PRNG keys.

Everything is a pure function of (logits, key, allowed mask) so one jitted call per step picks the token on device;
the sampling settings are static, so greedy decoding compiles to a plain argmax.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from linalign_jax.errors import LinalignError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_p < 1 keeps the smallest set of tokens whose probability reaches top_p."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise LinalignError(f"temperature must be a finite float >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise LinalignError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def mask_logits(logits, allowed):
    """Disallowed tokens get -inf; `allowed` None keeps every token."""
    return logits if allowed is None else jnp.where(allowed, logits, -jnp.inf)


def top_p_filter(logits, top_p: float):
    """-inf outside the nucleus: tokens are kept, in descending order, while the mass *before* them is < top_p, so
    the most likely token always survives."""
    order = jnp.argsort(-logits)
    sorted_logits = logits[order]
    probs = jax.nn.softmax(sorted_logits)
    mass_before = jnp.cumsum(probs) - probs
    kept_sorted = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    return jnp.full_like(logits, -jnp.inf).at[order].set(kept_sorted)


def sample_logits(logits, key, config: SamplingConfig, allowed=None):
    """One token id (int32 scalar) from logits [V] float32."""
    logits = mask_logits(logits.astype(jnp.float32), allowed)
    if config.greedy:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits / config.temperature
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return jax.random.categorical(key, logits).astype(jnp.int32)
