"""Extraction across processes: each process extracts its `process_slice` of the texts on its own devices.

Two ways to get the rows back together:
- `extract_gathered`: every process receives the full [N, d] array (no shared filesystem needed; fine while N x d
  fits in host memory, as it does for map fitting).
- `extract_to_shards`: every process writes `shard-PPPPP-of-CCCCC.npy` into one directory on a filesystem all
  processes see, and process 0 writes `manifest.json` (row range, shape and sha256 of every shard) once all shards
  exist; `load_shards` verifies and concatenates them. The manifest is written last and atomically, so a directory
  without one is an incomplete run.

With a `data_fingerprint`, each process goes through the feature cache under a per-slice key, so a rerun with the
same process count reuses every shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from linalign_jax import features
from linalign_jax.distributed import barrier, process_allgather_rows, process_slice, process_stack
from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import atomic_path, atomic_write_json, sha256_file
from linalign_jax.models.base import LoadedModel

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def extract_local_slice(model: LoadedModel, texts: Sequence[str], *, data_fingerprint: Optional[str] = None,
                        cache_dir=None, **extract_kwargs) -> features.FeatureSet:
    """This process's rows of the pooled features of `texts` (through the cache when `data_fingerprint` is given)."""
    if extract_kwargs.get("pooling") == "tokens":
        raise LinalignError("distributed extraction gathers pooled features; pooling='tokens' is per process only")
    rows = process_slice(len(texts))
    local = list(texts[rows])
    if not local:  # more processes than texts: this one contributes no rows
        return features.FeatureSet(np.zeros((0, model.hidden_size), np.float32), {"n_texts": 0, "tokens": 0})
    if data_fingerprint is None:
        return features.extract_features(model, local, **extract_kwargs)
    return features.cached_features(model, local, f"{data_fingerprint}[{rows.start}:{rows.stop}]",
                                    cache_dir=cache_dir, **extract_kwargs)


def extract_gathered(model: LoadedModel, texts: Sequence[str], **kwargs) -> np.ndarray:
    """Pooled features [N, d] of all texts, on every process; each process computed only its own slice."""
    return process_allgather_rows(extract_local_slice(model, texts, **kwargs).array)


def extract_to_shards(model: LoadedModel, texts: Sequence[str], out_dir, **kwargs) -> Tuple[Path, np.ndarray]:
    """Write this process's shard, then (process 0) the manifest. Returns (manifest path, this process's rows), the
    latter ready for `align.distributed`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index, count = jax.process_index(), jax.process_count()
    rows = process_slice(len(texts))
    local = extract_local_slice(model, texts, **kwargs)
    shard = out_dir / f"shard-{index:05d}-of-{count:05d}.npy"
    with atomic_path(shard) as tmp:
        np.save(tmp, local.array, allow_pickle=False)
    info = process_stack({
        "rows": np.array([rows.start, rows.stop], np.int64),
        "sha256": np.frombuffer(bytes.fromhex(sha256_file(shard)), np.uint8),
        "tokens": np.array(local.metadata.get("tokens", 0), np.int64),
        "seconds": np.array(local.metadata.get("seconds", 0.0), np.float64),
        "cache_hit": np.array(local.metadata.get("cache") == "hit"),
    })
    manifest = out_dir / MANIFEST
    if index == 0:
        shards = [{"file": f"shard-{p:05d}-of-{count:05d}.npy", "rows": info["rows"][p].tolist(),
                   "sha256": info["sha256"][p].tobytes().hex(), "tokens": int(info["tokens"][p]),
                   "seconds": float(info["seconds"][p]), "cache_hit": bool(info["cache_hit"][p])}
                  for p in range(count)]
        slowest = max(s["seconds"] for s in shards)
        atomic_write_json(manifest, {
            "format": MANIFEST_FORMAT, "n_rows": len(texts), "hidden_size": model.hidden_size, "dtype": "float32",
            "processes": count, "shards": shards,
            "model_spec": model.spec, "model_fingerprint": model.fingerprint,
            "data_fingerprint": kwargs.get("data_fingerprint"),
            "extract": {k: v for k, v in kwargs.items() if k not in ("data_fingerprint", "cache_dir", "mesh")},
            "tokens_per_second": sum(s["tokens"] for s in shards) / slowest if slowest > 0 else None,
        })
    barrier(f"manifest:{out_dir}")
    return manifest, local.array


def load_shards(out_dir) -> np.ndarray:
    """The [N, d] features of a sharded extraction, every shard checked against the manifest."""
    out_dir = Path(out_dir)
    try:
        manifest: Dict[str, Any] = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise LinalignError(f"{out_dir} has no readable {MANIFEST} (incomplete sharded extraction?): {e}") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise LinalignError(f"{out_dir / MANIFEST}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    parts, next_row = [], 0
    for shard in manifest["shards"]:
        path = out_dir / shard["file"]
        start, stop = shard["rows"]
        if start != next_row:
            raise LinalignError(f"{path}: rows start at {start}, expected {next_row} (shards must tile the rows)")
        if not path.is_file():
            raise LinalignError(f"{path} is missing (was out_dir on a filesystem every process could see?)")
        if sha256_file(path) != shard["sha256"]:
            raise LinalignError(f"{path}: sha256 differs from the manifest (corrupt or overwritten shard)")
        array = np.load(path, allow_pickle=False)
        if array.shape != (stop - start, manifest["hidden_size"]):
            raise LinalignError(f"{path}: shape {array.shape}, manifest says "
                                f"({stop - start}, {manifest['hidden_size']})")
        parts.append(array)
        next_row = stop
    if next_row != manifest["n_rows"]:
        raise LinalignError(f"{out_dir / MANIFEST}: shards cover {next_row} rows of {manifest['n_rows']}")
    return np.concatenate(parts, axis=0)
