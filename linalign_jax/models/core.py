"""The one decoder-only transformer every decoder family (llama, qwen2, qwen3, gemma3, gpt2) is an instance of.

A family is a `DecoderConfig` (frozen, hashable: a static argument of `jax.jit`) plus a checkpoint-name table; the
differences between families are flags here (norm kind, biases, q/k norm, sandwich norms, embedding scale, learned
positions, per-layer sliding windows with their own RoPE base, soft-capping), not code paths in five modules.

Layers are stacked with `nn.scan`, so parameters carry a leading layer axis and compile time does not grow with depth.
All attention goes through one `attend` (fused or explicit, see attention.py) that masks by *position ids*: a key is visible when it is a real token
(position >= 0), not in the future, and within the window on sliding layers. Position ids come from the attention
mask (cumsum - 1), which makes left and right padding give identical states for the real tokens, and lets the same
code serve both the full forward pass and incremental decoding.

Incremental decoding (the generation stage builds on this; `LoadedModel.init_cache` / `.extend` / `.lm_head` are
these functions with the config bound and jitted):

    cache = init_cache(config, batch_size, max_length)              # KVCache, static shapes [L, B, S, K, D]
    out, cache = extend(config, params, prompt_ids, prompt_mask, cache)   # prefill: T prompt tokens at once
    logits = lm_head(config, params, out.last_hidden_state[:, -1])  # [B, vocab] float32
    out, cache = extend(config, params, next_ids[:, None], jnp.ones_like(next_ids)[:, None], cache)  # one step

`extend` writes the new keys/values at slots [cache.length, cache.length + T) and attends over the whole buffer, so
the logits of every step equal those of a full forward pass over the concatenated sequence. Its shapes depend only on
(B, T, S): jit it once for the prefill length (bucket prompts and left-pad them) and once for T = 1. Padding tokens
(mask 0) occupy a slot but are never attended to; the next position of each row is the count of its real tokens so
far. Sliding-window layers keep the full buffer (the window is a mask), which is simple and exact; S bounds memory.
The caller must keep `cache.length + T <= S` (checked eagerly by `extend` when the length is concrete).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import sha256_bytes
from linalign_jax.models import attention as attention_ops
from linalign_jax.models.base import ModelOutput

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROPE_KINDS = ("default", "linear", "llama3", "yarn", "longrope")
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
FULL, SLIDING = "full_attention", "sliding_attention"
XIELU = "xielu"  # apertus: an activation with learned per-layer parameters (see `Mlp`)
MOE_IMPLS = ("auto", "dense", "grouped")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture of experts: a softmax router over `num_experts` gated MLPs keeps the `top_k` most probable per token
    and adds their outputs weighted by those probabilities (renormalised to sum 1 when `normalize_top_k`: mixtral,
    qwen3_moe's norm_topk_prob). qwen2_moe adds an always-on shared expert scaled by sigmoid(x . gate).

    impl "dense" runs every expert on every token and weights the outputs (zero weight outside the top k): exact, and
    the fast choice on CPU for small expert counts. "grouped" sorts the (token, expert) pairs by expert and runs only
    those with `jax.lax.ragged_dot`. "auto" is dense on CPU, grouped elsewhere.
    """

    num_experts: int
    top_k: int
    expert_size: int
    normalize_top_k: bool = False
    shared_expert_size: int = 0
    impl: str = "auto"

    def __post_init__(self):
        if not 0 < self.top_k <= self.num_experts:
            raise LinalignError(f"mixture of experts needs 0 < top_k <= num_experts, got {self.top_k} of "
                                f"{self.num_experts}")
        if self.impl not in MOE_IMPLS:
            raise LinalignError(f"unsupported MoE impl {self.impl!r}; supported: {', '.join(MOE_IMPLS)}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies, following HF's `rope_type`s (default, linear, llama3, yarn)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0   # llama3 / yarn: the pre-training context length
    low_freq_factor: float = 1.0                # llama3
    high_freq_factor: float = 4.0               # llama3
    beta_fast: float = 32.0                     # yarn
    beta_slow: float = 1.0                      # yarn
    attention_factor: Optional[float] = None    # yarn: scales cos/sin; None -> derived from factor (and mscales)
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True
    short_factor: Tuple[float, ...] = ()        # longrope: per-frequency divisors up to the pre-training length
    long_factor: Tuple[float, ...] = ()         # longrope: ... and beyond it

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise LinalignError(f"unsupported rope_type {self.kind!r}; supported: {', '.join(ROPE_KINDS)}")

    def inverse_frequencies(self, head_dim: int, long: bool = False) -> Tuple[np.ndarray, float]:
        """(inv_freq [head_dim // 2] float32, cos/sin scale), computed in float64 on the host. `long` picks
        longrope's long factors (the other kinds have one set)."""
        inv_freq = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        scale = 1.0
        if self.kind == "longrope":
            return self._longrope(inv_freq, long)
        if self.kind == "linear":
            inv_freq = inv_freq / self.factor
        elif self.kind == "llama3":
            inv_freq = self._llama3(inv_freq)
        elif self.kind == "yarn":
            inv_freq, scale = self._yarn(inv_freq, head_dim)
        return inv_freq.astype(np.float32), scale

    def _longrope(self, inv_freq: np.ndarray, long: bool) -> Tuple[np.ndarray, float]:
        factors = np.asarray(self.long_factor if long else self.short_factor, np.float64)
        if factors.shape != inv_freq.shape:
            raise LinalignError(f"longrope needs {inv_freq.size} short and long factors, got {len(self.short_factor)}"
                                f" and {len(self.long_factor)}")
        old = self.original_max_position_embeddings
        scale = self.attention_factor
        if scale is None:  # from the context extension factor, as transformers derives it
            scale = 1.0 if self.factor <= 1 else math.sqrt(1 + math.log(self.factor) / math.log(old))
        return (inv_freq / factors).astype(np.float32), float(scale)

    def _llama3(self, inv_freq: np.ndarray) -> np.ndarray:
        old = self.original_max_position_embeddings
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)

    def _yarn(self, inv_freq: np.ndarray, dim: int) -> Tuple[np.ndarray, float]:
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        factor, attention = self.factor, self.attention_factor
        if attention is None:
            attention = (mscale(factor, self.mscale) / mscale(factor, self.mscale_all_dim)
                         if self.mscale and self.mscale_all_dim else mscale(factor))

        def correction_dim(rotations):
            return dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, float(attention)


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """What `Norm` needs: RMSNorm ("rms") or LayerNorm ("layer", with a bias unless `bias=False`: ModernBERT), and
    gemma's (1 + w) scale."""

    kind: str = "rms"
    eps: float = 1e-6
    unit_offset: bool = False
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class MlpConfig:
    """What `Mlp` needs: gated (gate, up, down: SwiGLU / GeGLU) or plain (up, down), with or without biases."""

    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    gated: bool = True
    bias: bool = False
    dtype: str = "float32"

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def activation_from_hf(hf: dict, key: str, supported: dict, default: str):
    """The core activation name of HF config field `key` (missing -> `default`), through the family's table
    `supported` {HF name: core name}; anything else is an error naming what is supported."""
    name = hf.get(key) or default
    if name not in supported:
        raise LinalignError(f"{key}={name!r} is not supported for {hf.get('model_type')}; "
                            f"supported: {', '.join(sorted(supported))}")
    return supported[name]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything that shapes a decoder; families differ only in these fields (see each family's `config_from_hf`)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "rms"                      # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False         # gemma: weight stored as w, applied as (1 + w)
    activation: str = "silu"
    gated_mlp: bool = True                 # SwiGLU / GeGLU (gate, up, down) or plain (up, down)
    qkv_bias: bool = False
    out_bias: bool = False                 # bias on o_proj and the MLP (gpt2)
    qk_norm: bool = False                  # RMSNorm over head_dim on q and k (qwen3, gemma3)
    qk_norm_all_heads: bool = False        # ... over all heads at once, before the head split (olmo2, olmo3)
    pre_norms: bool = True                 # norms before attention and MLP; False: only the post norms (olmo2)
    sandwich_norms: bool = False           # extra norms after attention and MLP (gemma2, gemma3, olmo2)
    embed_scale: bool = False              # multiply embeddings by sqrt(hidden_size) (gemma)
    learned_positions: bool = False        # gpt2: absolute position embeddings instead of RoPE
    rope: RopeConfig = RopeConfig()
    local_rope: Optional[RopeConfig] = None  # RoPE of sliding layers when it differs (gemma3)
    layer_types: Tuple[str, ...] = ()      # FULL / SLIDING per layer
    sliding_window: Optional[int] = None
    query_scale: float = 0.0               # 0 -> head_dim ** -0.5
    # ministral3 (Llama 4 scaling): queries times 1 + beta * log(1 + floor(position / period)), after RoPE.
    query_position_beta: float = 0.0
    query_position_period: int = 1
    moe: Optional["MoeConfig"] = None      # a mixture of experts replaces every layer's MLP
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    tie_embeddings: bool = True
    has_lm_head: bool = True               # False: an untied base-model checkpoint (no lm_head.weight), no logits
    pad_token_id: int = 0
    dtype: str = "float32"
    attention: str = "auto"                # attention_ops.IMPLEMENTATIONS; how, not what: not in the fingerprint

    def __post_init__(self):
        if self.attention not in attention_ops.IMPLEMENTATIONS:
            raise LinalignError(f"unknown attention {self.attention!r}; expected one of "
                                f"{', '.join(attention_ops.IMPLEMENTATIONS)}")
        if self.dtype not in DTYPES:
            raise LinalignError(f"unsupported dtype {self.dtype!r}; supported: {', '.join(DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise LinalignError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {FULL, SLIDING}:
            raise LinalignError(
                f"layer_types must be {self.num_layers} of {FULL!r}/{SLIDING!r}, got {self.layer_types}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise LinalignError("sliding_attention layers need a positive sliding_window")
        if self.activation not in ACTIVATIONS and self.activation != XIELU:
            raise LinalignError(f"unsupported activation {self.activation!r}; supported: "
                                f"{', '.join([*ACTIVATIONS, XIELU])}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def scale(self) -> float:
        return self.query_scale or self.head_dim ** -0.5

    @property
    def norm_config(self) -> NormConfig:
        return NormConfig(self.norm, self.norm_eps, self.norm_unit_offset)

    @property
    def mlp_config(self) -> MlpConfig:
        return MlpConfig(self.hidden_size, self.intermediate_size, self.activation, self.gated_mlp, self.out_bias,
                         self.dtype)


def config_hash(config) -> str:
    """sha256 of a config dataclass (all fields, dtype included, but not the attention or MoE implementation: each
    pair is exact and agrees to float rounding), part of the model fingerprint."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "attention"}
    if fields.get("moe"):
        fields["moe"] = {k: v for k, v in fields["moe"].items() if k != "impl"}
    return sha256_bytes(json.dumps(fields, sort_keys=True).encode())


# ----------------------------------------------------------------------------------------------------------- layers

class Norm(nn.Module):
    """RMSNorm or LayerNorm, computed in float32; gemma's (1 + w) form when `unit_offset`."""

    config: NormConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = nn.initializers.zeros if cfg.unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32).astype(jnp.float32)
        xf = x.astype(jnp.float32)
        if cfg.kind == "layer":
            xf = xf - xf.mean(-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + cfg.eps)
        y = y * (1.0 + scale if cfg.unit_offset else scale)
        if cfg.kind == "layer" and cfg.bias:
            y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32).astype(jnp.float32)
        return y.astype(x.dtype)


def rotate(x, cos, sin):
    """HF's rotate-half RoPE: x [B, T, N, D], cos/sin [B, T, D // 2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def rope_tables(rope: RopeConfig, head_dim: int, positions):
    """cos, sin [B, T, head_dim // 2] float32 for integer positions [B, T].

    longrope, like transformers, uses its long factors for the whole call once any position reaches the pre-training
    length (so a cached prefix computed with the short ones is not re-rotated: the same as transformers' cache).
    """
    inv_freq, scale = rope.inverse_frequencies(head_dim)
    inv_freq = jnp.asarray(inv_freq)
    if rope.kind == "longrope":
        long = jnp.max(positions) + 1 > rope.original_max_position_embeddings
        inv_freq = jnp.where(long, jnp.asarray(rope.inverse_frequencies(head_dim, long=True)[0]), inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def attend(q, k, v, q_pos, k_pos, window, scale: float, softcap: Optional[float], causal: bool = False,
           implementation: str = "auto"):
    """Grouped-query attention masked by positions (through `attention.attention`).

    q [B, T, H, D]; k, v [B, S, K, D]; q_pos [B, T], k_pos [B, S] (-1 marks a slot with no real token); window: None or
    a scalar (traced is fine) such that keys with q_pos - k_pos >= window are hidden. `causal`: q and k are the same
    T tokens (the full forward pass); positions grow along the sequence, so the mask is inside the causal triangle.
    """
    B, T, H, D = q.shape
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    visible = (kp >= 0) & (kp <= qp)
    if window is not None:
        visible &= qp - kp < window
    out = attention_ops.attention(q, k, v, scale=scale, mask=visible[:, None], causal=causal, softcap=softcap,
                              implementation=implementation)
    return out.reshape(B, T, H * D)


class Attention(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, is_sliding, ctx, cache_kv):
        cfg = self.config
        dense = lambda n, bias, name: nn.Dense(n, use_bias=bias, dtype=cfg.compute_dtype, name=name)  # noqa: E731
        B, T, _ = x.shape
        q = dense(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, "q_proj")(x)
        k = dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "k_proj")(x)
        v = dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "v_proj")(x).reshape(B, T, cfg.num_kv_heads, -1)
        if cfg.qk_norm and cfg.qk_norm_all_heads:
            q, k = Norm(cfg.norm_config, name="q_norm")(q), Norm(cfg.norm_config, name="k_norm")(k)
        q, k = q.reshape(B, T, cfg.num_heads, cfg.head_dim), k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm and not cfg.qk_norm_all_heads:
            q, k = Norm(cfg.norm_config, name="q_norm")(q), Norm(cfg.norm_config, name="k_norm")(k)
        if not cfg.learned_positions:
            cos = jnp.where(is_sliding, ctx["cos_local"], ctx["cos"])
            sin = jnp.where(is_sliding, ctx["sin_local"], ctx["sin"])
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cfg.query_position_beta:
            periods = jnp.floor(jnp.maximum(ctx["q_pos"], 0) / cfg.query_position_period)
            q = q * (1 + cfg.query_position_beta * jnp.log1p(periods))[:, :, None, None].astype(q.dtype)
        if cache_kv is not None:  # write the new slots, then attend over the whole buffer
            start = (0, ctx["cache_index"], 0, 0)
            k = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), start)
        window = None
        if cfg.sliding_window:
            window = jnp.where(is_sliding, cfg.sliding_window, jnp.iinfo(jnp.int32).max)
        out = attend(q, k, v, ctx["q_pos"], ctx["k_pos"], window, cfg.scale, cfg.attn_logit_softcap,
                     causal=cache_kv is None, implementation=cfg.attention)
        return dense(cfg.hidden_size, cfg.out_bias, "o_proj")(out), (k, v)


class Mlp(nn.Module):
    config: MlpConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=cfg.bias, dtype=cfg.compute_dtype, name=name)  # noqa: E731
        act = XieluActivation(name="act") if cfg.activation == XIELU else ACTIVATIONS[cfg.activation]
        h = dense(cfg.intermediate_size, "up_proj")(x)
        h = act(dense(cfg.intermediate_size, "gate_proj")(x)) * h if cfg.gated else act(h)
        return dense(cfg.hidden_size, "down_proj")(h)


class XieluActivation(nn.Module):
    """xIELU (arXiv 2411.13010; apertus): quadratic for x > 0, a saturating exponential below, with learned slopes
    (stored through softplus, as transformers does) and the checkpoint's beta and eps."""

    @nn.compact
    def __call__(self, x):
        alpha_p = jax.nn.softplus(self.param("alpha_p", nn.initializers.zeros, (1,), jnp.float32))
        beta = self.param("beta", nn.initializers.constant(0.5), (), jnp.float32)
        alpha_n = beta + jax.nn.softplus(self.param("alpha_n", nn.initializers.zeros, (1,), jnp.float32))
        eps = self.param("eps", nn.initializers.constant(-1e-6), (), jnp.float32)
        alpha_p, alpha_n, beta, eps = (a.astype(x.dtype) for a in (alpha_p, alpha_n, beta, eps))
        return jnp.where(x > 0, alpha_p * x * x + beta * x, (jnp.expm1(jnp.minimum(x, eps)) - x) * alpha_n + beta * x)


def moe_impl(moe: MoeConfig) -> str:
    return ("dense" if jax.default_backend() == "cpu" else "grouped") if moe.impl == "auto" else moe.impl


class MoeMlp(nn.Module):
    """The mixture of experts of `MoeConfig`. Expert weights are stacked [E, in, out] (sharded over the mesh's "model"
    axis by distributed.TRANSFORMER_RULES); the router's softmax and top-k run in float32, as in transformers."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg, moe = self.config, self.config.moe
        E, d, f = moe.num_experts, cfg.hidden_size, moe.expert_size
        dt = cfg.compute_dtype
        router = nn.Dense(E, use_bias=False, dtype=dt, name="router")(x)
        probs = jax.nn.softmax(router.astype(jnp.float32), axis=-1)
        top, index = jax.lax.top_k(probs, moe.top_k)                              # [..., k]
        if moe.normalize_top_k:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        gate = self.param("experts_gate_proj", init, (E, d, f), jnp.float32).astype(dt)
        up = self.param("experts_up_proj", init, (E, d, f), jnp.float32).astype(dt)
        down = self.param("experts_down_proj", init, (E, f, d), jnp.float32).astype(dt)
        act = ACTIVATIONS[cfg.activation]
        if moe_impl(moe) == "dense":  # every expert on every token; weights are zero outside the top k
            weights = jnp.sum(jax.nn.one_hot(index, E, dtype=jnp.float32) * top[..., None], axis=-2)  # [..., E]
            h = act(jnp.einsum("...d,edf->...ef", x, gate)) * jnp.einsum("...d,edf->...ef", x, up)
            out = jnp.einsum("...ef,efd->...d", h * weights[..., None].astype(dt), down)
        else:  # only the chosen (token, expert) pairs, grouped by expert
            rows = x.reshape(-1, d)
            experts = index.reshape(-1)
            order = jnp.argsort(experts)
            token = order // moe.top_k
            sizes = jnp.bincount(experts, length=E).astype(jnp.int32)
            xs = rows[token]
            h = act(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
            ys = jax.lax.ragged_dot(h, down, sizes) * top.reshape(-1)[order][:, None].astype(dt)
            out = jnp.zeros_like(rows).at[token].add(ys).reshape(x.shape)
        if moe.shared_expert_size:
            shared = Mlp(dataclasses.replace(cfg.mlp_config, intermediate_size=moe.shared_expert_size),
                         name="shared_expert")(x)
            out = out + jax.nn.sigmoid(nn.Dense(1, use_bias=False, dtype=dt, name="shared_expert_gate")(x)) * shared
        return out


class Block(nn.Module):
    """One pre-norm layer; scanned over the layer axis. xs = (is_sliding, cache (k, v) or None)."""

    config: DecoderConfig
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, x, xs, ctx):
        cfg = self.config
        is_sliding, cache_kv = xs
        pre_norm = (lambda name: Norm(cfg.norm_config, name=name)) if cfg.pre_norms else (lambda name: lambda y: y)
        h, kv = Attention(cfg, name="attn")(pre_norm("attn_norm")(x), is_sliding, ctx, cache_kv)
        if cfg.sandwich_norms:
            h = Norm(cfg.norm_config, name="attn_post_norm")(h)
        x = x + h
        mlp = MoeMlp(cfg, name="mlp") if cfg.moe else Mlp(cfg.mlp_config, name="mlp")
        h = mlp(pre_norm("mlp_norm")(x))
        if cfg.sandwich_norms:
            h = Norm(cfg.norm_config, name="mlp_post_norm")(h)
        x = x + h
        return x, (x if self.collect_hidden else None, kv if cache_kv is not None else None)


def embed_inputs(cfg: DecoderConfig, embedding, pos_embedding, input_ids, q_pos, k_pos, cache_index):
    """Token embeddings (scaled; + learned positions) and the context every layer reads (positions, RoPE tables)."""
    x = jnp.take(embedding.astype(cfg.compute_dtype), input_ids, axis=0)
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, cfg.compute_dtype)
    ctx = {"q_pos": q_pos, "k_pos": k_pos, "cache_index": cache_index}
    if cfg.learned_positions:
        x = x + jnp.take(pos_embedding.astype(cfg.compute_dtype), jnp.clip(q_pos, 0, cfg.max_position_embeddings - 1),
                         axis=0)
    else:
        ctx["cos"], ctx["sin"] = rope_tables(cfg.rope, cfg.head_dim, q_pos)
        local = cfg.local_rope or cfg.rope
        ctx["cos_local"], ctx["sin_local"] = rope_tables(local, cfg.head_dim, q_pos)
    return x, ctx


class Decoder(nn.Module):
    """Token ids + positions -> (final-norm hidden states, per-layer states, updated cache k/v)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, input_ids, q_pos, k_pos, cache_kv=None, cache_index=0, output_hidden_states=False):
        cfg = self.config
        embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, name="embed").embedding
        positions = (nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.compute_dtype,
                              name="pos_embed").embedding if cfg.learned_positions else None)
        x, ctx = embed_inputs(cfg, embedding, positions, input_ids, q_pos, k_pos, cache_index)
        if not cfg.tie_embeddings and cfg.has_lm_head:  # declared here so `init` creates it; applied by `lm_head`
            self.param("lm_head", nn.initializers.lecun_normal(), (cfg.hidden_size, cfg.vocab_size), jnp.float32)
        layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast), length=cfg.num_layers)
        is_sliding = jnp.asarray([t == SLIDING for t in cfg.layer_types])
        x_out, (per_layer, new_kv) = layers(cfg, output_hidden_states, name="layers")(x, (is_sliding, cache_kv), ctx)
        hidden = Norm(cfg.norm_config, name="final_norm")(x_out)
        all_hidden = (x, *[per_layer[i] for i in range(cfg.num_layers)]) if output_hidden_states else None
        return hidden, all_hidden, new_kv


# ------------------------------------------------------------------------------------------------- pure functions

def positions_from_mask(attention_mask):
    """Position ids of the real tokens (cumsum - 1) and -1 for padding, which `attend` never lets a query see."""
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.cumsum(mask, axis=-1) - 1
    return positions, jnp.where(mask > 0, positions, -1)


def forward(config: DecoderConfig, params, input_ids, attention_mask, output_hidden_states: bool = False):
    """The full forward pass of base.py's contract -> ModelOutput (jit with config and the flag static)."""
    q_pos, k_pos = positions_from_mask(attention_mask)
    hidden, all_hidden, _ = Decoder(config).apply(
        {"params": params}, input_ids, q_pos, k_pos, output_hidden_states=output_hidden_states)
    return ModelOutput(last_hidden_state=hidden, hidden_states=all_hidden)


def lm_head(config: DecoderConfig, params, hidden):
    """Logits [..., vocab] float32 from (possibly mapped) final hidden states; tied or untied, soft-capped if set.

    Uses params["lm_head"] [d, vocab] when present, which `with_head_kernel` adds for tied models: XLA:CPU multiplies
    by a [d, vocab] kernel about 12x faster than by the transposed [vocab, d] embedding (measured: 0.36 s vs 4.4 s of
    CPU for 5 x 640 x 262k), and every decoding step pays this product.
    """
    if not (config.tie_embeddings or config.has_lm_head):
        raise LinalignError(f"this {config.family} checkpoint is a base model (no lm_head.weight, untied embeddings): "
                            "it gives hidden states but no logits; load its causal-LM checkpoint for an LM head")
    hidden = hidden.astype(config.compute_dtype)
    if "lm_head" in params:
        logits = jnp.einsum("...d,dv->...v", hidden, params["lm_head"].astype(config.compute_dtype),
                            preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...d,vd->...v", hidden, params["embed"]["embedding"].astype(config.compute_dtype),
                            preferred_element_type=jnp.float32)
    if config.final_logit_softcap:
        logits = jnp.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
    return logits


def with_head_kernel(config: DecoderConfig, params):
    """For tied models, add the output kernel [d, vocab] as a contiguous copy of embedding.T (see `lm_head`); costs
    one more vocabulary matrix of memory. Untied models already have it."""
    if "lm_head" in params or not config.tie_embeddings:
        return params
    return {**params, "lm_head": jnp.asarray(params["embed"]["embedding"]).T.copy()}


def init_params(config: DecoderConfig, rng: jax.Array, seq_len: int = 8):
    """Random parameters with the layout the checkpoint tables fill (for tests and benchmarks)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    q_pos, k_pos = positions_from_mask(jnp.ones_like(ids))
    params = Decoder(config).init(rng, ids, q_pos, k_pos)["params"]
    return jax.tree_util.tree_map(lambda p: p.astype(config.compute_dtype), params)


# ---------------------------------------------------------------------------------------- incremental decoding

@dataclasses.dataclass(frozen=True)
class KVCache:
    """Preallocated keys/values [L, B, S, K, D] (for `extend_layerwise`: tuples of L arrays [B, S, K, D]);
    `positions` [B, S] holds each slot's position id (-1: empty, padding or forgotten); `length` (int32 scalar) is
    the number of slots written, the same for every row."""

    k: Any
    v: Any
    positions: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.positions.shape[1]


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "positions", "length"], meta_fields=[])


def init_cache(config: DecoderConfig, batch_size: int, max_length: int, dtype: Optional[str] = None,
               per_layer: bool = False) -> KVCache:
    """An empty cache; `per_layer`: k and v as tuples of per-layer arrays (the layout `extend_layerwise` uses)."""
    if batch_size <= 0 or max_length <= 0:
        raise LinalignError(f"cache needs batch_size > 0 and max_length > 0, got {batch_size}, {max_length}")
    dt = DTYPES[dtype or config.dtype]
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    if per_layer:
        k = tuple(jnp.zeros(shape, dt) for _ in range(config.num_layers))
        v = tuple(jnp.zeros(shape, dt) for _ in range(config.num_layers))
    else:
        k = v = jnp.zeros((config.num_layers, *shape), dt)
    return KVCache(k=k, v=v, positions=jnp.full((batch_size, max_length), -1, jnp.int32),
                   length=jnp.zeros((), jnp.int32))


def extend(config: DecoderConfig, params, input_ids, attention_mask, cache: KVCache,
           output_hidden_states: bool = False) -> Tuple[ModelOutput, KVCache]:
    """Run T new tokens per row on top of `cache`; returns their states and the cache holding them (see module doc)."""
    T = input_ids.shape[1]
    try:
        used = int(cache.length)
    except jax.errors.ConcretizationTypeError:  # under jit: the caller owns the bound
        used = None
    if used is not None and used + T > cache.max_length:
        raise LinalignError(f"KV cache overflow: {used} slots used + {T} new > max_length {cache.max_length}; "
                            "allocate a longer cache")
    q_pos, positions = _step_positions(attention_mask, cache)
    hidden, all_hidden, (k, v) = Decoder(config).apply(
        {"params": params}, input_ids, q_pos, positions, cache_kv=(cache.k, cache.v), cache_index=cache.length,
        output_hidden_states=output_hidden_states)
    new_cache = KVCache(k=k, v=v, positions=positions, length=cache.length + T)
    return ModelOutput(last_hidden_state=hidden, hidden_states=all_hidden), new_cache


def _step_positions(attention_mask, cache: KVCache):
    """Position ids of T new tokens per row (continuing each row's last position) and the cache's updated slots."""
    mask = attention_mask.astype(jnp.int32)
    start = jnp.max(cache.positions, axis=-1, keepdims=True) + 1          # next position of each row
    q_pos = start + jnp.cumsum(mask, axis=-1) - 1
    positions = jax.lax.dynamic_update_slice(cache.positions, jnp.where(mask > 0, q_pos, -1), (0, cache.length))
    return q_pos, positions


# ------------------------------------------------------------------------------- layer-at-a-time decoding steps

def unstack_layers(params) -> Tuple[dict, List[dict]]:
    """(everything but the layers, [layer 0 params, layer 1 params, ...]): a copy of the layer weights, split off
    the scanned `layers` stack for `extend_layerwise`."""
    stacked = params["layers"]
    num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    return rest, [jax.tree_util.tree_map(lambda a: a[i], stacked) for i in range(num_layers)]


@functools.lru_cache(maxsize=None)
def _layerwise_programs(config: DecoderConfig):
    def begin(rest, input_ids, attention_mask, cache_positions, cache_length):
        cache = KVCache(k=(), v=(), positions=cache_positions, length=cache_length)
        q_pos, positions = _step_positions(attention_mask, cache)
        embedding = rest["embed"]["embedding"]
        pos_embedding = rest["pos_embed"]["embedding"] if config.learned_positions else None
        x, ctx = embed_inputs(config, embedding, pos_embedding, input_ids, q_pos, positions, cache_length)
        return x, ctx, positions

    def layer(layer_params, x, is_sliding, k, v, ctx):
        x, (_, (k, v)) = Block(config).apply({"params": layer_params}, x, (is_sliding, (k, v)), ctx)
        return x, k, v

    def end(rest, x):
        return Norm(config.norm_config).apply({"params": rest["final_norm"]}, x)

    return jax.jit(begin), jax.jit(layer, donate_argnums=(3, 4)), jax.jit(end)


def extend_layerwise(config: DecoderConfig, rest, layers: List[dict], input_ids, attention_mask,
                     cache: KVCache) -> Tuple[jax.Array, KVCache]:
    """`extend` run one jitted layer at a time over `unstack_layers` parameters and a `per_layer` cache ->
    (final-norm hidden states [B, T, d], updated cache; the cache passed in is donated).

    Why not one jitted `extend`: XLA:CPU copies every stacked-weight slice a scanned layer reads (one SmolLM2-135M
    token step cost 227 ms of CPU against 43 ms with separate per-layer weights, batch 1), and a program with every
    layer unrolled takes minutes to compile on a loaded 2-core machine; one program per layer compiles once for all
    layers (sliding or not is an argument) and costs a few dispatches per step.
    """
    begin, layer, end = _layerwise_programs(config)
    x, ctx, positions = begin(rest, input_ids, attention_mask, cache.positions, cache.length)
    ks, vs = [], []
    for i, kind in enumerate(config.layer_types):
        x, k, v = layer(layers[i], x, kind == SLIDING, cache.k[i], cache.v[i], ctx)
        ks.append(k)
        vs.append(v)
    hidden = end(rest, x)
    T = input_ids.shape[1]
    return hidden, KVCache(k=tuple(ks), v=tuple(vs), positions=positions, length=cache.length + T)
