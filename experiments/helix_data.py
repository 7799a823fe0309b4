"""Data glue shared by the HELIX binaries (no flags of its own, so any binary can import it): each party embeds its
texts with its own model through the feature cache (or reads them from its precomputed embeddings file)."""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from linalign_jax.features import ExtractOptions


@functools.lru_cache(maxsize=2)
def _embedder(spec: str, dtype: str):
    """Each model (or embeddings file) is opened once per process, however many text sets a binary embeds with it."""
    from linalign_jax.embedders import open_embedder

    return open_embedder(spec, dtype=dtype)


def embed(spec: str, texts: Sequence[str], options: ExtractOptions, dtype: str = "float32") -> np.ndarray:
    """Pooled features [N, d] of `texts` under `spec`: a model (through the feature cache) or a precomputed embeddings
    .parquet file (its rows looked up by text)."""
    embedder = _embedder(spec, dtype)
    return embedder.features(list(texts), data=f"--model={spec}", **options.cache_kwargs(embedder.model)).array


def input_bound(queries: np.ndarray) -> float:
    """The public bound a client declares for its queries: the next power of two of the largest |entry| (a power of
    two keeps the CKKS scale exact; floored at 1e-12, so an all-zero batch gives a finite bound, not 2^-inf)."""
    return float(2.0 ** np.ceil(np.log2(max(float(np.abs(queries).max()), 1e-12))))


def embed_with_flags(flag_values, texts: Sequence[str], missing_model: str) -> np.ndarray:
    """`embed` with the binary's --model, --dtype and extraction flags; `missing_model` says why --model is needed."""
    from linalign_jax import cli
    from linalign_jax.errors import LinalignError

    if not flag_values.model:
        raise LinalignError(f"--model is required {missing_model}")
    return embed(flag_values.model, texts, cli.extraction_options(), flag_values.dtype)
