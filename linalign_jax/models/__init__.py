"""Model zoo: `load_model(spec, dtype)` -> `LoadedModel` (base.py: the interface every family implements).

A spec is an asset name or hub id (resolved by `linalign_jax.assets.resolve_model`), a local HF directory
(config.json + model.safetensors or a sharded index) or a .gguf file (materialised once into an HF directory under
$LINALIGN_CACHE, see gguf.py). The directory's `config.json` `model_type` picks the `Family` in `REGISTRY`
(registry.py); loader.py runs the one loading pipeline.
"""
from linalign_jax.models.base import Family, LoadedModel
from linalign_jax.models.loader import abstract_decoder, decoder_model, encoder_model, load_model
from linalign_jax.models.registry import FAMILIES, REGISTRY, supported_model_types

__all__ = ["load_model", "abstract_decoder", "decoder_model", "encoder_model", "Family", "FAMILIES", "REGISTRY",
           "LoadedModel", "supported_model_types"]
