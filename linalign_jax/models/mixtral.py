"""Mixtral: Mistral with every MLP replaced by a mixture of experts (core.MoeConfig): softmax router, top
`num_experts_per_tok` of `num_local_experts`, weights renormalised over the chosen experts; experts are w1 (gate),
w3 (up), w2 (down), one tensor each.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from linalign_jax.errors import LinalignError
from linalign_jax.models import llama
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule
from linalign_jax.models.core import DecoderConfig, MoeConfig

MOE = "model.layers.{i}.block_sparse_moe."
EXPERT_RULES: Tuple[Rule, ...] = (
    (MOE + "gate.weight", "mlp/router/kernel", "T"),
    (MOE + "experts.{e}.w1.weight", "mlp/experts_gate_proj", "T"),
    (MOE + "experts.{e}.w3.weight", "mlp/experts_up_proj", "T"),
    (MOE + "experts.{e}.w2.weight", "mlp/experts_down_proj", "T"),
)
ignore = llama.ignore
normalize_names = llama.normalize_names


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    return (llama.GLOBAL_RULES + llama.ATTENTION_RULES + llama.PRE_NORM_RULES + EXPERT_RULES
            + llama.head_rules(config))


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    try:
        moe = MoeConfig(num_experts=int(hf["num_local_experts"]), top_k=int(hf["num_experts_per_tok"]),
                        expert_size=int(hf["intermediate_size"]), normalize_top_k=True)
    except KeyError as e:
        raise LinalignError(f"config.json lacks {e.args[0]!r}, needed for a mixtral model") from None
    return DecoderConfig(family="mixtral", **llama.decoder_fields({"rms_norm_eps": 1e-5, **hf}, dtype),
                         **llama.sliding_fields(hf, default_sliding=True), activation=llama.silu(hf), moe=moe)


FAMILY = Family(name="mixtral", model_types=("mixtral",), kind=DECODER, config_from_hf=config_from_hf, rules=rules,
                ignore=ignore, normalize_names=normalize_names)
