"""The fitted affine map z_target ≈ z_source W + b as a two-leaf pytree, and its on-disk form.

On disk a map is a directory holding `map.safetensors` (W, b as float32) and `map.json` (method, λ, model specs and
fingerprints, pooling, data fingerprint, metrics, ...). Loading checks the shapes against the metadata and, when the
caller says which models it is about to connect, that the map was fitted between those models.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import atomic_path, atomic_write_json

WEIGHTS_FILE = "map.safetensors"
METADATA_FILE = "map.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class AffineMap:
    W: Any  # [d_source, d_target]
    b: Any  # [d_target]

    @property
    def source_dim(self) -> int:
        return int(self.W.shape[0])

    @property
    def target_dim(self) -> int:
        return int(self.W.shape[1])

    def __call__(self, x):
        return apply_map(self, x)


jax.tree_util.register_dataclass(AffineMap, data_fields=["W", "b"], meta_fields=[])


def apply_map(affine: AffineMap, x):
    """x [..., d_source] -> [..., d_target]; numpy in, numpy out (float32), jax in, jax out."""
    if x.shape[-1] != affine.source_dim:
        raise LinalignError(f"map expects source features of dim {affine.source_dim}, got shape {tuple(x.shape)}")
    if isinstance(x, np.ndarray):
        return (np.asarray(x, np.float32) @ np.asarray(affine.W, np.float32)
                + np.asarray(affine.b, np.float32)).astype(np.float32)
    return jnp.asarray(x) @ affine.W + affine.b


def save_map(path: str | Path, affine: AffineMap, metadata: Mapping[str, Any]) -> Path:
    """Write the map directory atomically; `metadata` must be JSON-serialisable with finite numbers only (map.json is
    strict JSON, readable by any parser)."""
    from safetensors.numpy import save_file

    path = Path(path)
    meta = dict(metadata)
    meta.update(format_version=FORMAT_VERSION, source_dim=affine.source_dim, target_dim=affine.target_dim)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file({"W": np.ascontiguousarray(affine.W, np.float32), "b": np.ascontiguousarray(affine.b, np.float32)},
                  str(tmp / WEIGHTS_FILE))
        try:
            atomic_write_json(tmp / METADATA_FILE, meta, strict=True)
        except ValueError as e:  # NaN / Infinity: map.json must stay strict JSON
            raise LinalignError(f"map metadata for {path} holds a non-finite number ({e}); nothing was written") \
                from None
    return path


def load_map(path: str | Path, *, source: str | None = None, target: str | None = None,
             source_dim: int | None = None, target_dim: int | None = None) -> tuple[AffineMap, dict]:
    """Read a map directory. `source`/`target` are model fingerprints (or specs) the map must have been fitted between."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    weights, meta_path = path / WEIGHTS_FILE, path / METADATA_FILE
    if not weights.is_file() or not meta_path.is_file():
        raise LinalignError(f"{path} is not a saved map: expected {WEIGHTS_FILE} and {METADATA_FILE} inside it")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as e:  # unreadable file, corrupt JSON or safetensors header
        raise LinalignError(f"saved map {path} is unreadable: {e}") from e
    if set(tensors) != {"W", "b"}:
        raise LinalignError(f"saved map {path} holds tensors {sorted(tensors)}, expected ['W', 'b']")
    W, b = tensors["W"], tensors["b"]
    if W.ndim != 2 or b.shape != (W.shape[1],) or list(W.shape) != [meta.get("source_dim"), meta.get("target_dim")]:
        raise LinalignError(f"saved map {path}: W {W.shape}, b {b.shape} disagree with metadata dims "
                            f"({meta.get('source_dim')}, {meta.get('target_dim')})")
    for name, want, have in (("source_dim", source_dim, W.shape[0]), ("target_dim", target_dim, W.shape[1])):
        if want is not None and want != have:
            raise LinalignError(f"saved map {path} has {name}={have}, but the features here have dim {want}")
    for side, want in (("source", source), ("target", target)):
        if want is None:
            continue
        known = {meta.get(f"{side}_model"), meta.get(f"{side}_fingerprint")} - {None}
        if want not in known:
            raise LinalignError(f"saved map {path} was fitted with {side} model {sorted(known)}, not {want!r}")
    return AffineMap(W=W, b=b), meta

