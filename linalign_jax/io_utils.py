"""Atomic file writes, hashing, the cache root and progress logging shared by every stage.

The library reports through `logging` (never print): binaries show INFO and above on stderr via
`configure_logging()`, which `cli.run` calls; a library user chooses for themselves.

Every artefact (cache entry, map, results file) is written to a temporary sibling and renamed into place, so an
interrupted run never leaves a file that looks complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from linalign_jax.errors import LinalignError
from typing import Any, Iterator


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """THE directory every cache lives under (assets, features, GGUF materialisations, hash memos): `cache_dir` if
    given, else $LINALIGN_CACHE (empty counts as unset), else ~/.cache/linalign_jax."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LINALIGN_CACHE") or "~/.cache/linalign_jax").expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error delete it.

    Works for files and directories (whatever the body creates at the yielded path). An existing directory is
    replaced whole: it is moved aside into the temporary folder and the new one renamed in right after, so `path` is
    the complete old directory, then (for the instant between two renames) absent, then the complete new one; it
    never mixes two runs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            os.replace(path, tmp / ".replaced")
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """An empty folder to write a whole run into; on success it replaces `path` (see `atomic_path`), on error it is
    deleted and whatever was at `path` is left untouched."""
    with atomic_path(path) as staging:
        staging.mkdir()
        yield staging


def check_outside(out_dir: str | os.PathLike, **inputs: str) -> None:
    """An output folder is replaced whole at the end of a run, so no input may live inside it."""
    out = Path(out_dir).expanduser().resolve()
    for name, value in inputs.items():
        if value and (out == Path(value).expanduser().resolve() or out in Path(value).expanduser().resolve().parents):
            raise LinalignError(f"--{name}={value} lies inside --out_dir={out_dir}, which a finished run replaces "
                                f"whole; move it out or pick another --out_dir")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, strict: bool = False) -> None:
    """strict=True: RFC 8259 JSON only — a NaN or Infinity anywhere raises ValueError before anything is written."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default,
                                       allow_nan=not strict) + "\n")


def atomic_write_arrays(arrays: dict, marker: str | os.PathLike, metadata: Any, stale: tuple = ()) -> None:
    """Replace a set of .npy files {path: array} and the JSON `marker` that says the set is complete.

    Every array is saved to a temporary folder first (a failure there leaves the old set whole); the old marker and
    `stale` files this set no longer has are removed, the arrays renamed into place, and the marker written last,
    so a set without its marker is never taken for a complete one.
    """
    import numpy as np

    marker = Path(marker)
    marker.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{marker.stem}.", dir=marker.parent) as staging:
        for path, array in arrays.items():
            np.save(Path(staging) / Path(path).name, array, allow_pickle=False)
        marker.unlink(missing_ok=True)
        for path in stale:
            if path not in arrays:
                Path(path).unlink(missing_ok=True)
        for path in arrays:
            os.replace(Path(staging) / Path(path).name, path)
    atomic_write_json(marker, metadata)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


log = logging.getLogger(__name__)


def configure_logging(level: int = logging.INFO) -> None:
    """Log records of `level` and above as `HH:MM:SS name: message` on stderr (for binaries; replaces any handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class Progress:
    """Logs `label: done/total (rate unit/s)` at most every `every` seconds, and once at the end."""

    def __init__(self, label: str, total: int | None = None, unit: str = "items", every: float = 5.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = 0
        self.units = 0.0
        self.start = self._last = time.perf_counter()
        self._printed = None  # `done` at the last printed line

    def update(self, n: int = 1, units: float | None = None) -> None:
        self.done += n
        self.units += n if units is None else units
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self._print(now)

    def close(self) -> float:
        """Log the final line, unless the last line logged already says it; return the seconds elapsed."""
        now = time.perf_counter()
        if self._printed != self.done:
            self._print(now)
        return now - self.start

    def rate(self) -> float:
        return self.units / max(time.perf_counter() - self.start, 1e-9)

    def _print(self, now: float) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        rate = self.units / max(now - self.start, 1e-9)
        self._printed = self.done
        log.info("%s: %d%s (%s %s/s, %.1fs)", self.label, self.done, total, f"{rate:,.1f}", self.unit,
                 now - self.start)
