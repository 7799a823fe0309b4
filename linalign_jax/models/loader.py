"""`load_model(spec, dtype)`: the one pipeline every family goes through.

    spec -> HF directory (asset name / hub id via `assets.resolve_model`, a local directory, or a .gguf file
            materialised once under $LINALIGN_CACHE, see gguf.py)
         -> config.json `model_type` -> the `Family` in `registry.REGISTRY`
         -> config = family.config_from_hf(config.json, dtype)
         -> tensors (safetensors, single or sharded) -> family.normalize_names -> params by family.rules(config)
         -> shapes checked against the module's own initialisation
         -> fingerprint: the weights (a materialised GGUF by the GGUF file's hash) and the config as run, dtype
            included: the same weights under another RoPE scaling or precision give other features
         -> LoadedModel (decoders with LM head and KV-cache functions, encoders with forward only)
"""
from __future__ import annotations

import dataclasses
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from linalign_jax.errors import LinalignError
from linalign_jax.models import checkpoint, core, gguf
from linalign_jax.models.conventions import conventions_for
from linalign_jax.models.base import DECODER, Family, LoadedModel
from linalign_jax.models.registry import REGISTRY, supported_model_types
from linalign_jax.models.tokenizer import load_tokenizer


def load_model(spec: str, dtype: str = "float32") -> LoadedModel:
    """Load a model from an asset name, hub id, HF directory or .gguf file (see module doc)."""
    if dtype not in core.DTYPES:
        raise LinalignError(f"unsupported dtype {dtype!r}; supported: {', '.join(core.DTYPES)}")
    model_dir = model_directory(spec)
    hf = json.loads((model_dir / "config.json").read_text())
    model_type = hf.get("model_type")
    if model_type not in REGISTRY:
        raise LinalignError(f"unsupported architecture model_type={model_type!r} in {model_dir / 'config.json'}; "
                            f"supported: {', '.join(supported_model_types())}")
    family = REGISTRY[model_type]
    config = family.config_from_hf(hf, dtype)
    # A decoder's family name is its config's (one Family may read several, e.g. gemma and gemma2).
    name = config.family if family.kind == DECODER else family.name
    tensors = family.normalize_names(checkpoint.read_checkpoint(model_dir))
    if family.kind == DECODER and not config.tie_embeddings and "lm_head.weight" not in tensors:
        config = dataclasses.replace(config, has_lm_head=False)  # a base-model checkpoint: no logits
    params = checkpoint.params_from_tensors(tensors, family.rules(config), config.num_layers, config.compute_dtype,
                                            family.ignore(config), name)
    checkpoint.check_shapes(params, _expected_params(family, config), name)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tokenizer = load_tokenizer(model_dir)
    source = gguf.source_of(model_dir)
    hashes = [source[1]] if source else [checkpoint.cached_sha256(f) for f in checkpoint.weight_files(model_dir)]
    fingerprint = checkpoint.fingerprint_from_hashes(hashes + [core.config_hash(config)], name)
    if family.kind == DECODER:
        model = decoder_model(config, core.with_head_kernel(config, params), tokenizer, spec=str(spec),
                              fingerprint=fingerprint)
    else:
        model = encoder_model(family, config, params, tokenizer, spec=str(spec), fingerprint=fingerprint)
    return dataclasses.replace(model, conventions=conventions_for(str(spec), model_dir, tokenizer))


def abstract_decoder(config_json: str | Path, dtype: str = "float32"):
    """(config, parameter shapes) that `load_model` builds for a decoder's config.json, without reading weights:
    `jax.eval_shape` of the module's init, so a 30B model costs nothing. The shapes are those the checkpoint must
    have (an untied head included; base-model checkpoints ship without it)."""
    path = Path(config_json)
    hf = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    family = REGISTRY.get(hf.get("model_type"))
    if family is None or family.kind != DECODER:
        decoders = sorted(t for t, f in REGISTRY.items() if f.kind == DECODER)
        raise LinalignError(f"abstract_decoder: model_type={hf.get('model_type')!r} is not a decoder; decoders: "
                            f"{', '.join(decoders)}")
    config = family.config_from_hf(hf, dtype)
    return config, _expected_params(family, config)


def model_directory(spec: str) -> Path:
    """The HF directory (config.json, weights, tokenizer.json) a spec names."""
    path = Path(str(spec)).expanduser()
    if not path.exists():
        from linalign_jax.assets import resolve_model

        path = Path(resolve_model(str(spec)))
    if gguf.is_gguf(path):
        path = gguf.materialize(path)
    if not (path / "config.json").is_file():
        raise LinalignError(f"{spec!r} resolved to {path}, which is neither an HF model directory (config.json) "
                            "nor a .gguf file")
    return path


def _expected_params(family: Family, config):
    """Parameter shapes of the family's module for `config`, without allocating them."""
    if family.kind == DECODER:
        return jax.eval_shape(functools.partial(core.init_params, config), jax.random.PRNGKey(0))
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(family.module(config).init, jax.random.PRNGKey(0), ids, ids + 1)["params"]


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


def encoder_model(family: Family, config, params, tokenizer, *, spec: str, fingerprint: str) -> LoadedModel:
    """Wrap an encoder config + params into a LoadedModel with a jitted forward."""
    module = family.module(config)

    @functools.partial(jax.jit, static_argnums=(3,))
    def forward(params, input_ids, attention_mask, output_hidden_states=False):
        return module.apply({"params": params}, input_ids, attention_mask, output_hidden_states)

    return LoadedModel(spec=spec, family=family.name, config=config, module=module, params=params,
                       tokenizer=tokenizer, fingerprint=fingerprint, is_decoder=False,
                       pad_token_id=config.pad_token_id, dtype=config.dtype, forward_fn=forward)
