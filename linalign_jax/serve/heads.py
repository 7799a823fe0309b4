"""The provider's head artefacts on disk: the trained head it serves, and the head variants its secure fits register.

A head directory holds `head.safetensors` (V [d, k], c [k], float64) and `head.json` (labels and provenance:
model spec, dataset, accuracy...). Writes are atomic, so a provider killed mid-write never leaves a head that loads.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.helix.protocol import ServedHead
from linalign_jax.io_utils import atomic_path, atomic_write_json

WEIGHTS_FILE, METADATA_FILE = "head.safetensors", "head.json"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def save_head(path: str | Path, head: ServedHead, metadata: Mapping[str, Any] | None = None) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file({"V": np.ascontiguousarray(head.V), "c": np.ascontiguousarray(head.c)}, str(tmp / WEIGHTS_FILE))
        atomic_write_json(tmp / METADATA_FILE, {**(metadata or {}), "labels": list(head.labels),
                                                "d": head.dims[0], "k": head.dims[1]})
    return path


def load_head(path: str | Path) -> tuple[ServedHead, dict[str, Any]]:
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / METADATA_FILE).is_file():
        raise LinalignError(f"{path} is not a saved head: expected {WEIGHTS_FILE} and {METADATA_FILE} inside it")
    try:
        meta = json.loads((path / METADATA_FILE).read_text())
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as e:  # corrupt JSON or safetensors header
        raise LinalignError(f"saved head {path} is unreadable: {e}") from e
    if set(tensors) != {"V", "c"}:
        raise LinalignError(f"saved head {path} holds tensors {sorted(tensors)}, expected ['V', 'c']")
    return ServedHead(tensors["V"], tensors["c"], tuple(meta.get("labels", ()))), meta


class HeadStore:
    """Head variants by name, persisted under `root` (one head directory each) when a root is given."""

    def __init__(self, root: str | Path | None = None):
        self.root = None if root is None else Path(root)
        self._cache: dict[str, ServedHead] = {}

    def __getitem__(self, name: str) -> ServedHead:
        if name not in self._cache:
            if self.root is None or not _NAME.match(name) or not (self.root / name).is_dir():
                raise KeyError(name)
            self._cache[name] = load_head(self.root / name)[0]
        return self._cache[name]

    def __setitem__(self, name: str, head: ServedHead) -> None:
        if not _NAME.match(name):
            raise LinalignError(f"head name {name!r} must match {_NAME.pattern}")
        if self.root is not None:
            save_head(self.root / name, head, {"kind": "secure-fit head variant"})
        self._cache[name] = head
