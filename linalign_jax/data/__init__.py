"""Datasets for alignment and evaluation: registry tasks (trec, rt-sentiment), the unlabeled `public` corpus, local
files and hub datasets, all as `datasets.DatasetDict` with `text` and ClassLabel `label` and deterministic splits.

    load_dataset(spec, seed=0, test_size=None)  -> DatasetDict(train, test)
    load_texts(spec, limit=None, seed=0)        -> list[str]
    fingerprint(dataset | texts | spec)         -> sha256 hex of the content (keys the feature cache)
"""
from linalign_jax.data.loaders import fingerprint, load_dataset, load_texts

__all__ = ["fingerprint", "load_dataset", "load_texts"]
