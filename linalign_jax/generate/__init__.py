"""Cross-model text generation: KV-cache decoding, token-level map fitting, hybrid source-body → target-head
decoding and its metrics (paper §2.3-2.4, §6.6-6.9)."""
from linalign_jax.generate.decoding import GenerationResult, generate
from linalign_jax.generate.hybrid import HybridPair
from linalign_jax.generate.sampling import SamplingConfig

__all__ = ["GenerationResult", "HybridPair", "SamplingConfig", "generate"]
