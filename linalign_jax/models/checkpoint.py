"""Checkpoint files -> parameter pytrees: a safetensors reader, table-driven name mapping and weight fingerprints.

The reader parses the safetensors header itself (8-byte length, JSON, raw little-endian data) over a memory map, so it
reads bfloat16 (through ml_dtypes) without torch, and a truncated file is caught by comparing the header's byte
offsets with the file size instead of failing somewhere inside numpy.

A family describes its checkpoint as a table of rules (hf_name, param_path, transform). `{i}` in a name marks a
per-layer tensor: the tensors of all layers are stacked on a leading axis under "layers/", the layout `nn.scan`
gives. Transforms: "" keeps the tensor, "T" transposes a torch Linear weight [out, in] into a Dense kernel [in, out],
"split3" cuts a fused q|k|v tensor along its last axis into the paths with `{qkv}` replaced by q, k and v (GPT-2's
Conv1D already stores [in, out]), "Tsplit:n1,n2,..." transposes and cuts the last axis into those sizes, for a path
naming the parts as `{a|b|...}` (phi3's fused qkv_proj and gate_up_proj). `{e}` in a per-layer name marks one tensor
per expert (mixture of experts): they are stacked on an expert axis after the layer axis, [L, E, ...].

Checkpoints come in two layouts: the causal LM (`AutoModelForCausalLM.save_pretrained`: names under `model.`, plus
`lm_head.weight` when untied) and the base model (`AutoModel`: the same names without `model.`, no head), which is how
embedding models ship. `causal_lm_names` renames the second into the first so one table reads both.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import ml_dtypes
import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import atomic_write_bytes, atomic_write_json, cache_root, sha256_bytes, sha256_file

Rule = Tuple[str, str, str]
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


# -------------------------------------------------------------------------------------------------- safetensors

def read_safetensors(path: str | os.PathLike) -> Dict[str, np.ndarray]:
    """All tensors of one .safetensors file as read-only numpy arrays backed by a memory map."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LinalignError(f"{path}: not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise LinalignError(f"{path}: header length {header_len} exceeds the file size {size} (truncated?)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LinalignError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + end > size:
        raise LinalignError(f"{path}: truncated: tensors need {data_start + end} bytes, the file has {size}")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise LinalignError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, stop = info["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = buf[data_start + begin:data_start + stop].view(dtype).reshape(info["shape"])
    return tensors


def write_safetensors(path: str | os.PathLike, tensors: Dict[str, np.ndarray]) -> None:
    """Atomically write float32/bfloat16/int tensors in the safetensors layout (what the reader above reads)."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name]).reshape(np.shape(tensors[name]))  # keeps 0-d shapes
        blob = arr.tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    atomic_write_bytes(path, struct.pack("<Q", len(head)) + head + b"".join(blobs))


def weight_files(model_dir: str | os.PathLike) -> List[Path]:
    """The safetensors files of an HF directory: model.safetensors, or the shards its index names."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX_FILE).exists():
        index = json.loads((model_dir / INDEX_FILE).read_text())
        files = [model_dir / name for name in sorted(set(index["weight_map"].values()))]
    elif (model_dir / SINGLE_FILE).exists():
        files = [model_dir / SINGLE_FILE]
    else:
        raise LinalignError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise LinalignError(f"{model_dir}: the index names missing shard files: {', '.join(missing)}")
    return files


def read_checkpoint(model_dir: str | os.PathLike) -> Dict[str, np.ndarray]:
    tensors: Dict[str, np.ndarray] = {}
    for path in weight_files(model_dir):
        tensors.update(read_safetensors(path))
    return tensors


# ----------------------------------------------------------------------------------------------- name mapping

def _set(tree: Dict[str, Any], path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _apply(transform: str, array: np.ndarray, path: str) -> List[Tuple[str, np.ndarray]]:
    if transform == "":
        return [(path, array)]
    if transform == "T":
        return [(path, array.T)]
    if transform == "split3":
        return [(path.replace("{qkv}", n), part) for n, part in zip("qkv", np.split(array, 3, axis=-1))]
    if transform.startswith("Tsplit:"):
        sizes = [int(n) for n in transform[len("Tsplit:"):].split(",")]
        alternatives = re.search(r"\{([^}]+)\}", path)
        names = alternatives.group(1).split("|")
        if array.shape[0] != sum(sizes):
            raise LinalignError(f"fused tensor for {path} has {array.shape[0]} rows, the config needs {sum(sizes)}")
        parts = np.split(array.T, np.cumsum(sizes)[:-1], axis=-1)
        return [(path.replace(alternatives.group(0), n), part) for n, part in zip(names, parts)]
    raise ValueError(f"unknown transform {transform!r}")


def _expert_names(pattern: str, layer: int, tensors: Dict[str, Any]) -> List[str]:
    """The per-expert names of one layer, experts 0, 1, ... while present (the count is checked by `check_shapes`)."""
    names = []
    while (name := pattern.format(i=layer, e=len(names))) in tensors:
        names.append(name)
    return names


def causal_lm_names(tensors: Dict[str, Any], prefix: str = "model.") -> Dict[str, Any]:
    """A base-model checkpoint (no name under `prefix`) renamed into the causal-LM layout; others unchanged."""
    if any(name.startswith(prefix) for name in tensors):
        return tensors
    return {prefix + name: value for name, value in tensors.items()}


# Multimodal checkpoints (gemma3, mistral3): where transformers 4 and 5 put the language model, in the causal-LM
# (...ForConditionalGeneration) and base (...Model) layouts; first match wins. The vision parts are not read.
LANGUAGE_MODEL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                           ("language_model.lm_head.", "lm_head."), ("language_model.", "model."))
VISION_IGNORE = (r"(model\.)?(vision_tower|multi_modal_projector)\..*",)


def language_model_names(tensors: Dict[str, Any]) -> Dict[str, Any]:
    """A multimodal or text-only checkpoint, in either layout, renamed to the text causal-LM layout."""
    out = {}
    for name, value in tensors.items():
        for old, new in LANGUAGE_MODEL_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = value
    return causal_lm_names(out)


def params_from_tensors(tensors: Dict[str, np.ndarray], rules: Sequence[Rule], num_layers: int, dtype,
                        ignore: Iterable[str] = (), family: str = "") -> Dict[str, Any]:
    """Apply a family's rules to checkpoint tensors -> nested dict of numpy arrays in `dtype`.

    Every rule must find its tensors and every checkpoint tensor must be used (or match an `ignore` regex), so a wrong
    table fails loudly instead of leaving parameters at zero.
    """
    params: Dict[str, Any] = {}
    used = set()
    for hf_name, path, transform in rules:
        if "{e}" in hf_name:
            per_layer = [_expert_names(hf_name, i, tensors) for i in range(num_layers)]
            if not all(per_layer) or len({len(n) for n in per_layer}) > 1:
                raise LinalignError(f"{family} checkpoint lacks experts {hf_name} (found "
                                    f"{[len(n) for n in per_layer]} per layer)")
            stacked = np.stack([np.stack([np.asarray(tensors[n]) for n in names]) for names in per_layer])
            _set(params, "layers/" + path, (np.swapaxes(stacked, -1, -2) if transform == "T" else stacked
                                            ).astype(dtype, copy=False))
            used.update(n for names in per_layer for n in names)
        elif "{i}" in hf_name:
            names = [hf_name.format(i=i) for i in range(num_layers)]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise LinalignError(f"{family} checkpoint lacks {missing[0]}" + (
                    f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            per_layer = [_apply(transform, np.asarray(tensors[n]), "layers/" + path) for n in names]
            for j, (target, _) in enumerate(per_layer[0]):
                _set(params, target, np.stack([parts[j][1] for parts in per_layer]).astype(dtype, copy=False))
            used.update(names)
        else:
            if hf_name not in tensors:
                raise LinalignError(f"{family} checkpoint lacks {hf_name}")
            for target, value in _apply(transform, np.asarray(tensors[hf_name]), path):
                _set(params, target, value.astype(dtype))
            used.add(hf_name)
    patterns = [re.compile(p) for p in ignore]
    unused = sorted(n for n in tensors if n not in used and not any(p.fullmatch(n) for p in patterns))
    if unused:
        raise LinalignError(f"{family} checkpoint has {len(unused)} tensors no rule maps, e.g. {unused[:5]}; "
                            "is this the right architecture?")
    return params


def check_shapes(params: Dict[str, Any], expected: Dict[str, Any], family: str = "") -> None:
    """Compare a loaded tree with the module's own (`jax.eval_shape` of init): names and shapes must agree."""
    import jax

    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    if got.keys() != want.keys():
        raise LinalignError(f"{family} parameters differ from the module's: missing {sorted(want.keys() - got.keys())}"
                            f", unexpected {sorted(got.keys() - want.keys())}")
    bad = [f"{k}: checkpoint {got[k]} vs config {want[k]}" for k in want if tuple(got[k]) != want[k]]
    if bad:
        raise LinalignError(f"{family} checkpoint shapes do not match its config: " + "; ".join(bad[:5]))


# ----------------------------------------------------------------------------------------------- fingerprints

def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered under $LINALIGN_CACHE/hashes by (path, size, mtime) so big files hash once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = sha256_bytes(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    memo = cache_root() / "hashes" / f"{key}.json"
    if memo.exists():
        try:
            return json.loads(memo.read_text())["sha256"]
        except (json.JSONDecodeError, KeyError):
            pass  # a damaged memo is recomputed below
    digest = sha256_file(path)
    atomic_write_json(memo, {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest})
    return digest


def fingerprint_from_hashes(hashes: Sequence[str], family: str) -> str:
    """sha256 over the family name and content hashes (weight files, config): identifies what runs, not where the
    files live."""
    return sha256_bytes("\n".join([family, *hashes]).encode())


def strip_prefix(prefix: str) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """A `Family.normalize_names` that drops `prefix` ("bert.", "transformer.", ...) from the tensor names."""

    def normalize(tensors: Dict[str, Any]) -> Dict[str, Any]:
        return {name[len(prefix):] if name.startswith(prefix) else name: value for name, value in tensors.items()}

    return normalize
