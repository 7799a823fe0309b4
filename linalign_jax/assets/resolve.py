"""Turn a model spec (registry name, hub id, local path) into a local path the model loaders can read.

Order: registry names and their hub-id aliases (served from the offline mirror); then an existing local path (write
./name for a local folder that shares a registry name); then any other `org/name[@revision]` goes to the Hugging Face
hub when online. An explicit `@revision` always means the hub, so an online user can still ask for the upstream
full-precision weights of a mirrored model.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Tuple

from linalign_jax.assets import registry
from linalign_jax.assets.cache import fetch
from linalign_jax.errors import LinalignError

GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# A spec ending like a file is a missing local path, never a hub id.
_FILE_SUFFIXES = {".gguf", ".safetensors", ".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt"}
# Files a JAX loader can use; skips PyTorch/TF/ONNX duplicates of the weights and the many quantizations in GGUF repos.
_HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")


def resolve_model(spec: str, cache_dir: Optional[os.PathLike] = None) -> Path:
    """A local HF model directory (with config.json) or .gguf file for `spec`."""
    spec = str(spec)
    asset = registry.find(spec)
    if asset is not None:
        if asset.kind != registry.MODEL:
            raise LinalignError(f"{spec!r} is a {asset.kind} asset, not a model; models: {', '.join(model_names())}")
        return fetch(asset.name, cache_dir)
    path = Path(spec).expanduser()
    if path.exists():
        return validate_model_path(path)
    if is_hub_id(spec):
        repo_id, revision = split_hub_id(spec)
        return validate_model_path(_snapshot(repo_id, revision))
    if os.sep in spec or path.suffix:
        raise LinalignError(f"model path {spec!r} does not exist")
    raise LinalignError(f"unknown model {spec!r}: expected a registry name ({', '.join(model_names())}), "
                        "a hub id org/name[@revision], an HF model directory or a .gguf file")


def model_names() -> list:
    return [asset.name for asset in registry.list_assets() if asset.kind == registry.MODEL]


def validate_model_path(path: Path) -> Path:
    """`path` if it is an HF model directory (has config.json) or a GGUF file (by magic bytes)."""
    path = path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
            raise LinalignError(f"{path} is not a Hugging Face model directory: no config.json (found: {found})")
        return path
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise LinalignError(f"{path} is neither a model directory nor a GGUF file (first bytes {magic!r}, "
                            f"expected {GGUF_MAGIC!r})")
    return path


def is_hub_id(spec: str) -> bool:
    """`org/name[@revision]` that does not name a file."""
    return bool(_HUB_ID.match(spec)) and Path(spec.partition("@")[0]).suffix.lower() not in _FILE_SUFFIXES


def split_hub_id(spec: str) -> Tuple[str, Optional[str]]:
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _snapshot(repo_id: str, revision: Optional[str]) -> Path:
    spec = repo_id + (f"@{revision}" if revision else "")
    if hub_offline():
        raise LinalignError(f"could not fetch {spec}: HF_HUB_OFFLINE is set and it is not a registry model "
                            f"({', '.join(model_names())}) or a local path")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(_HUB_PATTERNS)))
    except (OSError, ValueError) as err:  # hub HTTP / connection errors are OSErrors; a bad repo id or revision is a
        # ValueError; all mean the same thing to the caller
        raise LinalignError(f"could not fetch {spec}: {type(err).__name__}: {err}") from err
