"""Model zoo: `load_model(spec, dtype)` -> `LoadedModel` (see base.py for the interface every family implements).

A spec is an asset name or hub id (resolved by `linalign_jax.assets.resolve_model`), a local HF directory
(config.json + model.safetensors or a sharded index) or a .gguf file (materialised once into an HF directory under
$LINALIGN_CACHE, see gguf.py). The directory's `config.json` `model_type` picks the family loader in `REGISTRY`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable, Dict

import jax

from linalign_jax.errors import LinalignError
from linalign_jax.models import (apertus, bert, checkpoint, core, gemma, gemma3, gguf, gpt2, llama, mistral3,
                                  mixtral, mpnet, olmo, phi3, qwen, qwen_moe)
from linalign_jax.models.base import LoadedModel
from linalign_jax.models.tokenizer import load_tokenizer

__all__ = ["load_model", "REGISTRY", "LoadedModel", "supported_model_types", "abstract_decoder"]


def _decoder_loader(family) -> Callable[..., LoadedModel]:
    """A REGISTRY entry for a decoder family module (config_from_hf, rules, ignore[, normalize_names])."""

    def load(model_dir: Path, *, spec: str, dtype: str = "float32") -> LoadedModel:
        hf = json.loads((model_dir / "config.json").read_text())
        config = family.config_from_hf(hf, dtype)
        tensors = checkpoint.read_checkpoint(model_dir)
        tensors = getattr(family, "normalize_names", checkpoint.causal_lm_names)(tensors)
        if not config.tie_embeddings and "lm_head.weight" not in tensors:  # a base-model checkpoint: no logits
            config = dataclasses.replace(config, has_lm_head=False)
        params = checkpoint.params_from_tensors(tensors, family.rules(config), config.num_layers,
                                                config.compute_dtype, family.ignore(config), config.family)
        expected = jax.eval_shape(functools.partial(core.init_params, config), jax.random.PRNGKey(0))
        checkpoint.check_shapes(params, expected, config.family)
        params = core.with_head_kernel(config, jax.tree_util.tree_map(jax.numpy.asarray, params))
        # The weights (a materialised GGUF by the GGUF file's hash) and the config as run, dtype included: the same
        # weights under another RoPE scaling or precision give other features.
        source = gguf.source_of(model_dir)
        hashes = ([source[1]] if source else
                  [checkpoint.cached_sha256(f) for f in checkpoint.weight_files(model_dir)])
        fingerprint = checkpoint.fingerprint_from_hashes(hashes + [core.config_hash(config)], config.family)
        return decoder_model(config, params, load_tokenizer(model_dir), spec=spec, fingerprint=fingerprint)

    return load


# One jit per function, the config a static argument: models loaded twice with equal configs share compilations.
_FORWARD = jax.jit(core.forward, static_argnums=(0, 4))
_LM_HEAD = jax.jit(core.lm_head, static_argnums=(0,))
_EXTEND = jax.jit(core.extend, static_argnums=(0, 5))


def decoder_model(config: core.DecoderConfig, params, tokenizer, *, spec: str, fingerprint: str) -> LoadedModel:
    """Wrap a decoder config + params into a LoadedModel with jitted forward / head / cache functions."""
    return LoadedModel(
        spec=spec, family=config.family, config=config, module=core.Decoder(config), params=params,
        tokenizer=tokenizer, fingerprint=fingerprint, is_decoder=True, pad_token_id=config.pad_token_id,
        dtype=config.dtype,
        forward_fn=functools.partial(_FORWARD, config), lm_head_fn=functools.partial(_LM_HEAD, config),
        init_cache_fn=functools.partial(core.init_cache, config), extend_fn=functools.partial(_EXTEND, config))


DECODER_FAMILIES = {t: family for family in (llama, qwen, gemma3, gpt2, gemma, olmo, apertus, phi3, mistral3, qwen_moe,
                                              mixtral) for t in family.MODEL_TYPES}
REGISTRY: Dict[str, Callable[..., LoadedModel]] = {
    **{t: _decoder_loader(family) for t, family in DECODER_FAMILIES.items()},
    # ---- encoders: loaders with the same signature, load(model_dir, *, spec, dtype) -> LoadedModel ----
    "bert": bert.load,
    "mpnet": mpnet.load,
}


def abstract_decoder(config_json: str | Path, dtype: str = "float32"):
    """(config, parameter shapes) that `load_model` builds for a decoder's config.json, without reading weights:
    `jax.eval_shape` of the module's init, so a 30B model costs nothing. The shapes are those the checkpoint must
    have (an untied head included; base-model checkpoints ship without it)."""
    path = Path(config_json)
    hf = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    if hf.get("model_type") not in DECODER_FAMILIES:
        raise LinalignError(f"abstract_decoder: model_type={hf.get('model_type')!r} is not a decoder; decoders: "
                            f"{', '.join(sorted(DECODER_FAMILIES))}")
    config = DECODER_FAMILIES[hf["model_type"]].config_from_hf(hf, dtype)
    return config, jax.eval_shape(functools.partial(core.init_params, config), jax.random.PRNGKey(0))


def supported_model_types() -> list:
    return sorted(REGISTRY)


def load_model(spec: str, dtype: str = "float32") -> LoadedModel:
    """Load a model from an asset name, hub id, HF directory or .gguf file (see module doc)."""
    if dtype not in core.DTYPES:
        raise LinalignError(f"unsupported dtype {dtype!r}; supported: {', '.join(core.DTYPES)}")
    path = Path(str(spec)).expanduser()
    if not path.exists():
        from linalign_jax.assets import resolve_model

        path = Path(resolve_model(str(spec)))
    if gguf.is_gguf(path):
        path = gguf.materialize(path)
    if not (path / "config.json").is_file():
        raise LinalignError(f"{spec!r} resolved to {path}, which is neither an HF model directory (config.json) "
                            "nor a .gguf file")
    hf = json.loads((path / "config.json").read_text())
    model_type = hf.get("model_type")
    if model_type not in REGISTRY:
        raise LinalignError(f"unsupported architecture model_type={model_type!r} in {path / 'config.json'}; "
                            f"supported: {', '.join(supported_model_types())}")
    return REGISTRY[model_type](path, spec=str(spec), dtype=dtype)
