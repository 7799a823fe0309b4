"""Data glue shared by the HELIX binaries (no flags of its own, so any binary can import it): each party embeds its
texts with its own model through the feature cache (or reads them from its precomputed embeddings file), and
test rows are subsampled the way `experiments.align` does."""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import numpy as np


@functools.lru_cache(maxsize=2)
def _embedder(spec: str, dtype: str):
    """Each model (or embeddings file) is opened once per process, however many text sets a binary embeds with it."""
    from linalign_jax.embedders import open_embedder

    return open_embedder(spec, dtype=dtype)


def embed(spec: str, texts: Sequence[str], cfg: Mapping) -> np.ndarray:
    """Pooled features [N, d] of `texts` under `spec`: a model (through the feature cache) or a precomputed embeddings
    .parquet file (its rows looked up by text); cfg has pooling, normalize, max_length, batch_size, dtype."""
    return _embedder(spec, cfg["dtype"]).features(list(texts), pooling=cfg["pooling"], max_length=cfg["max_length"],
                                                  normalize=cfg["normalize"], batch_size=cfg["batch_size"],
                                                  data=f"--model={spec}").array


EMBED_FLAGS = ("pooling", "normalize", "max_length", "batch_size", "dtype")


def embed_with_flags(flag_values, texts: Sequence[str], missing_model: str) -> np.ndarray:
    """`embed` with the binary's --model and extraction flags; `missing_model` says why --model is needed."""
    from linalign_jax.errors import LinalignError

    if not flag_values.model:
        raise LinalignError(f"--model is required {missing_model}")
    return embed(flag_values.model, texts, {k: getattr(flag_values, k) for k in EMBED_FLAGS})


def subsample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified subsample of `limit` rows (all rows when limit is 0 or ≥ N)."""
    from linalign_jax.data.splits import stratified_split

    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    return np.sort(stratified_split(labels, limit, seed)[1])
