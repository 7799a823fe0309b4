"""Datasets for alignment and evaluation: registry tasks (trec, rt-sentiment), the unlabeled `public` corpus, local
files and hub datasets, all as `datasets.DatasetDict` with `text` and ClassLabel `label` and deterministic splits.

    load_dataset(spec, seed=0, test_size=None, text_column="text", label_column="label")
                                                -> DatasetDict(train, test): text, label, row
    load_texts(spec, limit=None, seed=0)        -> list[str]   (load_text_rows: + each text's source row)
    fingerprint(dataset | texts | spec)         -> sha256 hex of the content (keys the feature cache)
"""
from linalign_jax.data.loaders import fingerprint, load_dataset, load_text_rows, load_texts

__all__ = ["fingerprint", "load_dataset", "load_text_rows", "load_texts"]
