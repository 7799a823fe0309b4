"""Cross-model text generation (paper §2.3-2.4, §6.6-6.9): KV-cache decoding (`decoding`), sampling (`sampling`),
token-level map fitting (`token_map`), hybrid source-body → target-head decoding (`hybrid`) and its teacher-forced
next-token metrics (`evaluation`). Tokenizer plumbing and compatibility metrics live in `linalign_jax.tokenizer_compat`.
"""
from linalign_jax.generate.decoding import GenerationResult, generate, generate_batch
from linalign_jax.generate.evaluation import next_token_scores, summarize
from linalign_jax.generate.hybrid import HybridPair, load_pair_map
from linalign_jax.generate.sampling import SamplingConfig
from linalign_jax.generate.token_map import fit_token_map, fit_token_maps

__all__ = ["GenerationResult", "HybridPair", "SamplingConfig", "fit_token_map", "fit_token_maps", "generate", "generate_batch",
           "load_pair_map", "next_token_scores", "summarize"]
