"""Static shapes for `jax.jit`: every variable length is rounded up to a power of two, so a run compiles a handful of
executables instead of one per length."""
from __future__ import annotations

from typing import Optional


def bucket(n: int, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at `maximum` (which need not be a power of two)."""
    size = 1 << (max(int(n), int(minimum), 1) - 1).bit_length()
    return size if maximum is None else min(size, int(maximum))


# The shortest padded sequence: shorter texts and prompts share one executable.
MIN_SEQUENCE = 16
