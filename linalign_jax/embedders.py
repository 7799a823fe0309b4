"""One way for every binary to turn a model spec into embeddings: a model (asset name, hub id, HF directory, .gguf,
through the feature cache) or a precomputed embeddings file (`linalign_jax.precomputed`, a .parquet path).

    embedder = open_embedder(spec, dtype="float32")
    features = embedder.features(texts, pooling="mean", max_length=128, normalize=True, batch_size=64)
    embedder.info()   # {"spec", "fingerprint", "family", "dim"} for results and map metadata
    arrays, status = embed_sets(embedder, {"train": texts, ...}, options)   # every named set, cached

A precomputed file ignores pooling, layer, max_length, batch_size and instruction (its vectors are already pooled) and applies
`normalize` itself; its fingerprint names the model and dim, so a map fitted on one file's rows checks against
another file of the same model.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from linalign_jax.features import ExtractOptions, FeatureSet
from linalign_jax.precomputed import EmbeddingsFile, is_embeddings_spec, read_embeddings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Embedder:
    spec: str
    fingerprint: str
    family: str
    dim: int
    model: Any = None                       # LoadedModel, for a model spec
    file: Optional[EmbeddingsFile] = None   # for an embeddings file

    def info(self) -> dict:
        return {"spec": self.spec, "fingerprint": self.fingerprint, "family": self.family, "dim": int(self.dim)}

    def features(self, texts: Sequence[str], data_fingerprint: Optional[str] = None, *, pooling: str = "mean",
                 layer: int = -1, max_length: int = 128, normalize: bool = False, batch_size: int = 64,
                 cache: bool = True, cache_dir=None, data: str = "the data",
                 instruction: Optional[str] = None) -> FeatureSet:
        """[N, dim] float32 features of `texts`; `data` names them in errors (e.g. the dataset spec)."""
        texts = list(texts)
        if self.file is not None:
            array = self.file.lookup(texts, data)
            if normalize:
                array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
            return FeatureSet(array.astype(np.float32), {
                "cache": "precomputed", "n_texts": len(texts), "truncated": 0, "max_length": None,
                "pooling": "precomputed", "normalize": normalize, "model": self.file.model,
                "embeddings_file": str(self.file.path)})
        from linalign_jax import features as extraction
        from linalign_jax.data import fingerprint

        settings = dict(pooling=pooling, layer=layer, max_length=max_length, normalize=normalize,
                        batch_size=batch_size, instruction=instruction)
        if not cache:
            return extraction.extract_features(self.model, texts, **settings)
        return extraction.cached_features(self.model, texts, data_fingerprint or fingerprint(texts),
                                          cache_dir=cache_dir, **settings)


def open_embedder(spec: str, dtype: str = "float32", expect_dim: Optional[int] = None) -> Embedder:
    """Load the model `spec` names, or read and check the embeddings file it names."""
    log.info("loading %s", spec)
    if is_embeddings_spec(spec):
        file = read_embeddings(spec, expect_dim=expect_dim)
        return Embedder(spec=str(spec), fingerprint=file.fingerprint, family="precomputed", dim=file.dim, file=file)
    from linalign_jax.models import load_model

    model = load_model(spec, dtype=dtype)
    return Embedder(spec=str(spec), fingerprint=model.fingerprint, family=model.family,
                    dim=int(model.hidden_size), model=model)


def embed_sets(embedder: Embedder, sets: Mapping[str, Sequence[str]], options: ExtractOptions = ExtractOptions(),
               names: Optional[Mapping[str, str]] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, Dict[str, Any]]]:
    """Features of every named text set ({name: [N, dim] array}, cached per set) and per set its cache status and
    extraction time; `names` (set -> e.g. "trec (train)") names a set in errors."""
    arrays, status = {}, {}
    for name, texts in sets.items():
        result = embedder.features(texts, data=(names or {}).get(name, name), **options.cache_kwargs(embedder.model))
        arrays[name] = result.array
        status[name] = {"cache": result.metadata.get("cache"), "seconds": result.metadata.get("seconds"),
                        **{k: result.metadata.get(k) for k in ("pooling", "normalize", "max_length", "prompt")}}
    return arrays, status


@functools.lru_cache(maxsize=2)
def _opened(spec: str, dtype: str) -> Embedder:
    """Each model (or embeddings file) is opened once per process, however many text sets a binary embeds with it."""
    return open_embedder(spec, dtype=dtype)


def embed_texts(spec: str, texts: Sequence[str], options: ExtractOptions = ExtractOptions(),
                dtype: str = "float32") -> np.ndarray:
    """Pooled features [N, d] of `texts` under `spec` (through the feature cache; the embedder opened once)."""
    embedder = _opened(spec, dtype)
    return embedder.features(list(texts), data=f"--model={spec}", **options.cache_kwargs(embedder.model)).array
