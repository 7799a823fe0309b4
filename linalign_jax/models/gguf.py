"""GGUF files -> an ordinary HF model directory (config.json, model.safetensors, tokenizer.json), built once and cached.

`materialize(path)` dequantises every tensor to float32 with the `gguf` package, renames llama.cpp's tensors to HF
names (table below), undoes llama.cpp's conversions (the Q/K row permutation of llama-architecture files; the +1
baked into Gemma's RMSNorm weights), writes an HF-style config built from the GGUF metadata, and builds the tokenizer
from the embedded vocabulary. The directory is $LINALIGN_CACHE/gguf/<sha256 of the GGUF file>.v<FORMAT_VERSION>, so
later loads read float32 safetensors (seconds) instead of dequantising again (tens of seconds), and a changed file or
converter gets a new entry. The family loaders then treat it like any HF checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import Progress, atomic_path, atomic_write_json, cache_root
from linalign_jax.models import checkpoint
from linalign_jax.models.tokenizer import TOKENIZER_FILE, tokenizer_from_gguf

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
# llama.cpp tensor names -> HF names; per-architecture rows override the common ones.
COMMON_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
ARCH_NAMES = {
    "gemma3": {
        "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    },
}
GEMMA3_WINDOW_PATTERN = 6  # llama.cpp: every 6th Gemma 3 layer is global; local layers use RoPE base 10k
GEMMA3_LOCAL_ROPE_BASE = 10000.0
SOURCE_FILE = "gguf_source.json"
# Bumped whenever materialisation changes its output (names, conversions, tokenizer), so stale entries are rebuilt.
FORMAT_VERSION = 2


def read_metadata(reader) -> Dict[str, Any]:
    """All GGUF key/value fields as Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        out[key] = value.tolist() if isinstance(value, np.ndarray) else value
    return out


def config_from_metadata(md: Dict[str, Any], tensor_names) -> Dict[str, Any]:
    """An HF-style config.json dict for the architectures we support, from llama.cpp's metadata keys."""
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LinalignError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if "rope_freqs.weight" in tensor_names:
        raise LinalignError("this GGUF stores llama3 RoPE scaling as a rope_freqs tensor, which is not supported; "
                            "load the HF safetensors checkpoint instead")

    def get(key, default=None):
        return md.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = int(get("vocab_size") or len(md["tokenizer.ggml.tokens"]))
    cfg = {
        "model_type": MODEL_TYPE[arch], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
    }
    for key in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{key}_token_id" in md:
            cfg[f"{'pad' if key == 'padding' else key}_token_id"] = int(md[f"tokenizer.ggml.{key}_token_id"])
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length"):
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    if arch in ("qwen2", "qwen3"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    if arch == "gemma3":
        layers = cfg["num_hidden_layers"]
        cfg.update(
            hidden_activation="gelu_pytorch_tanh", sliding_window=int(get("attention.sliding_window", 4096)),
            rope_local_base_freq=GEMMA3_LOCAL_ROPE_BASE,
            layer_types=["full_attention" if (i + 1) % GEMMA3_WINDOW_PATTERN == 0 else "sliding_attention"
                         for i in range(layers)],
            # llama.cpp scales queries by head_dim ** -0.5, except for the 27B model (62 layers): (d / heads) ** -0.5
            query_pre_attn_scalar=hidden // heads if layers == 62 else cfg["head_dim"])
    return cfg


def unpermute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves in Q/K rows ([out, in] layout)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensors(reader, arch: str, cfg: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Every tensor dequantised to float32 under its HF name, with llama.cpp's conversions undone."""
    from gguf.quants import dequantize

    names = {**COMMON_NAMES, **ARCH_NAMES.get(arch, {})}
    lookup = {}
    for i in range(cfg["num_hidden_layers"]):
        for src, dst in names.items():
            lookup[src.format(i=i)] = dst.format(i=i)
    out = {}
    progress = Progress("dequantising GGUF tensors", total=len(reader.tensors), unit="tensors")
    for tensor in reader.tensors:
        if tensor.name not in lookup:
            raise LinalignError(f"GGUF tensor {tensor.name!r} has no HF name for architecture {arch}")
        try:
            weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise LinalignError(f"GGUF tensor {tensor.name} has quantisation type {tensor.tensor_type.name}, which "
                                f"the gguf package cannot dequantise ({e})") from None
        expected = tuple(int(d) for d in reversed(tensor.shape))
        weight = weight.reshape(expected)
        name = lookup[tensor.name]
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            weight = unpermute_qk(weight, heads)
        if arch == "gemma3" and tensor.name.endswith("norm.weight"):
            weight = weight - 1.0  # llama.cpp stores Gemma's (1 + w) norms as 1 + w
        out[name] = weight
        progress.update()
    progress.close()
    return out


def materialize(gguf_path: str | os.PathLike) -> Path:
    """The cached HF directory for a GGUF file, built on first use (see module doc)."""
    import gguf

    gguf_path = Path(gguf_path)
    digest = checkpoint.cached_sha256(gguf_path)
    target = cache_root() / "gguf" / f"{digest}.v{FORMAT_VERSION}"
    if all((target / f).exists() for f in ("config.json", checkpoint.SINGLE_FILE, TOKENIZER_FILE, SOURCE_FILE)):
        return target
    start = time.perf_counter()
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError, IndexError) as e:
        raise LinalignError(f"{gguf_path}: unreadable GGUF file ({type(e).__name__}: {e}); truncated?") from None
    md = read_metadata(reader)
    tensor_names = {t.name for t in reader.tensors}
    cfg = config_from_metadata(md, tensor_names)
    arch = md["general.architecture"]
    log.info("materialising %s (%s) into %s", gguf_path.name, arch, target)
    tensors = hf_tensors(reader, arch, cfg)
    tokenizer = tokenizer_from_gguf(md, arch)
    with atomic_path(target) as tmp:
        tmp.mkdir()
        checkpoint.write_safetensors(tmp / checkpoint.SINGLE_FILE, tensors)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        atomic_write_json(tmp / SOURCE_FILE, {"gguf": str(gguf_path.resolve()), "sha256": digest,
                                              "name": md.get("general.name"), "file_type": md.get("general.file_type")})
    log.info("materialised %s in %.1fs", gguf_path.name, time.perf_counter() - start)
    return target


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def source_of(model_dir: Path) -> Tuple[str, str] | None:
    """(gguf path, sha256) when `model_dir` was materialised from a GGUF file."""
    meta = model_dir / SOURCE_FILE
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    return info["gguf"], info["sha256"]
