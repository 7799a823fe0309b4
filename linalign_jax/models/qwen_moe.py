"""Qwen2-MoE and Qwen3-MoE: qwen2 / qwen3 with every MLP replaced by a mixture of experts (core.MoeConfig).
The router keeps the top `num_experts_per_tok` softmax probabilities, renormalised when `norm_topk_prob`; Qwen2-MoE
adds a shared expert scaled by sigmoid(x . shared_expert_gate). Checkpoints store one tensor per expert.
Configs that mix dense and MoE layers (`mlp_only_layers`, `decoder_sparse_step` > 1) are rejected: the layers are
one scanned stack.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

from linalign_jax.errors import LinalignError
from linalign_jax.models import llama, qwen
from linalign_jax.models.base import DECODER, Family
from linalign_jax.models.checkpoint import Rule
from linalign_jax.models.core import DecoderConfig, MoeConfig

EXPERT_RULES: Tuple[Rule, ...] = (("model.layers.{i}.mlp.gate.weight", "mlp/router/kernel", "T"),) + tuple(
    (f"model.layers.{{i}}.mlp.experts.{{e}}.{p}_proj.weight", f"mlp/experts_{p}_proj", "T")
    for p in ("gate", "up", "down"))
SHARED_RULES: Tuple[Rule, ...] = (("model.layers.{i}.mlp.shared_expert_gate.weight",
                                   "mlp/shared_expert_gate/kernel", "T"),) + tuple(
    (f"model.layers.{{i}}.mlp.shared_expert.{p}_proj.weight", f"mlp/shared_expert/{p}_proj/kernel", "T")
    for p in ("gate", "up", "down"))
ignore = llama.ignore
normalize_names = llama.normalize_names


def rules(config: DecoderConfig) -> Tuple[Rule, ...]:
    dense = qwen.rules(config)
    return (tuple(r for r in dense if r not in llama.MLP_RULES) + EXPERT_RULES
            + (SHARED_RULES if config.moe.shared_expert_size else ()))


def check_all_layers_sparse(hf: Dict[str, Any]) -> None:
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise LinalignError(f"{hf['model_type']} configs that mix dense and MoE layers (mlp_only_layers="
                            f"{hf.get('mlp_only_layers')}, decoder_sparse_step={hf.get('decoder_sparse_step')}) "
                            "are not supported")


def config_from_hf(hf: Dict[str, Any], dtype: str = "float32") -> DecoderConfig:
    check_all_layers_sparse(hf)
    family = hf["model_type"]
    qwen3 = family == "qwen3_moe"
    if "num_experts" not in hf and "num_local_experts" in hf:  # transformers 5 writes qwen3_moe's under this name
        hf = {**hf, "num_experts": hf["num_local_experts"]}
    try:
        moe = MoeConfig(num_experts=int(hf["num_experts"]), top_k=int(hf["num_experts_per_tok"]),
                        expert_size=int(hf["moe_intermediate_size"]),
                        normalize_top_k=bool(hf.get("norm_topk_prob", False)),
                        shared_expert_size=0 if qwen3 else int(hf["shared_expert_intermediate_size"]))
    except KeyError as e:
        raise LinalignError(f"config.json lacks {e.args[0]!r}, needed for a {family} model") from None
    dense = (qwen.qwen3_config if qwen3 else qwen.qwen2_config)(hf, dtype)
    return dataclasses.replace(dense, family=family, moe=moe,
                               qkv_bias=dense.qkv_bias if qwen3 else bool(hf.get("qkv_bias", True)))


FAMILY = Family(name="qwen_moe", model_types=("qwen2_moe", "qwen3_moe"), kind=DECODER,
                config_from_hf=config_from_hf, rules=rules, ignore=ignore, normalize_names=normalize_names)
