"""The provider's head artefacts on disk: the trained head it serves, and the head variants its secure fits register.

A head directory holds `head.safetensors` (V [d, k], c [k], float64) and `head.json` (labels and provenance:
model spec, dataset, accuracy...). Writes are atomic, so a provider killed mid-write never leaves a head that loads.
"""
from __future__ import annotations

import collections
import json
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.helix.protocol import ServedHead
from linalign_jax.io_utils import atomic_path, atomic_write_json

WEIGHTS_FILE, METADATA_FILE = "head.safetensors", "head.json"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def train_task_head(embed: Callable[[Sequence[str]], np.ndarray], task, *, train_limit: int, test_limit: int,
                    data_seed: int, head_seed: int, test_accuracy: bool) -> tuple[ServedHead, dict[str, Any]]:
    """The provider's own head for a labelled task (a datasets.DatasetDict with train / test): a linear head trained
    on its embeddings of a stratified subsample of the train split, optionally scored on the test split; returns the
    head and its provenance (train_rows, test_accuracy) for `save_head`."""
    import jax

    from linalign_jax.data.splits import stratified_subsample
    from linalign_jax.evaluate.heads import accuracy, train_head

    labels = np.asarray(task["train"]["label"])
    keep = stratified_subsample(labels, train_limit, data_seed)
    names = tuple(task["train"].features["label"].names)
    head = train_head(embed([task["train"]["text"][i] for i in keep]), labels[keep], len(names),
                      jax.random.PRNGKey(head_seed))
    score = None
    if test_accuracy:
        test_labels = np.asarray(task["test"]["label"])
        test_keep = stratified_subsample(test_labels, test_limit, data_seed)
        score = accuracy(head, embed([task["test"]["text"][i] for i in test_keep]), test_labels[test_keep])
    return (ServedHead(np.asarray(head.V), np.asarray(head.c), names),
            {"train_rows": len(keep), "test_accuracy": score})


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
    """Head variants by name, persisted under `root` (one head directory each) when a root is given.

    Bounded: at most `max_heads` variants (the oldest is deleted when a fit registers one more) and each lives
    `ttl_s` after its fit (then it is deleted, from disk too); a client with a map for a deleted variant is told to
    fit again. At most `cache` variants are held in memory; the rest are read back from disk on use."""

    def __init__(self, root: str | Path | None = None, *, max_heads: int = 256, ttl_s: float = 30 * 86400.0,
                 cache: int = 16, clock=time.time):
        if max_heads < 1 or ttl_s <= 0 or cache < 1:
            raise LinalignError(f"a head store needs max_heads >= 1, ttl_s > 0 and cache >= 1, got {max_heads}, "
                                f"{ttl_s}, {cache}")
        self.root = None if root is None else Path(root)
        self.max_heads, self.ttl_s, self._clock = max_heads, ttl_s, clock
        self._cache_size = cache if self.root is not None else max_heads  # memory is the only copy without a root
        self._cache: collections.OrderedDict[str, ServedHead] = collections.OrderedDict()
        self._created: dict[str, float] = {}
        self._lock = threading.Lock()
        if self.root is not None and self.root.is_dir():
            for path in self.root.iterdir():
                if _NAME.match(path.name) and (path / METADATA_FILE).is_file():
                    self._created[path.name] = (path / METADATA_FILE).stat().st_mtime

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._created)

    def __getitem__(self, name: str) -> ServedHead:
        with self._lock:
            self._expire()
            if name not in self._created:
                raise KeyError(name)
            if name not in self._cache:
                if self.root is None:
                    raise KeyError(name)
                self._cache[name] = load_head(self.root / name)[0]
            self._cache.move_to_end(name)
            head = self._cache[name]
            self._trim_cache()
            return head

    def __setitem__(self, name: str, head: ServedHead) -> None:
        if not _NAME.match(name):
            raise LinalignError(f"head name {name!r} must match {_NAME.pattern}")
        with self._lock:
            self._expire()
            while len(self._created) >= self.max_heads:
                self._delete(min(self._created, key=self._created.get))
            if self.root is not None:
                save_head(self.root / name, head, {"kind": "secure-fit head variant"})
            self._created[name] = self._clock()
            self._cache[name] = head
            self._trim_cache()

    def _expire(self) -> None:
        now = self._clock()
        for name in [n for n, t in self._created.items() if now - t >= self.ttl_s]:
            self._delete(name)

    def _delete(self, name: str) -> None:
        self._created.pop(name, None)
        self._cache.pop(name, None)
        if self.root is not None:
            shutil.rmtree(self.root / name, ignore_errors=True)

    def _trim_cache(self) -> None:
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
