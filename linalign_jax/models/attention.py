"""Scaled dot-product attention for every model family: one function, two exact implementations.

    attention(q [B, T, N, D], k [B, S, K, D], v [B, S, K, D], scale=..., mask=..., bias=...) -> [B, T, N, D]

N query heads share K key/value heads (GQA; N % K == 0). `mask` (bool, True = visible) and `bias` (added to the
scaled scores) broadcast to [B, N, T, S]; a row with no visible key gets a uniform softmax (finite, never NaN), as a
batch-filler row needs. Scores and softmax are float32 whatever the input dtype.

- "fused": `jax.nn.dot_product_attention`, cuDNN flash attention on a GPU in bfloat16/float16 where cuDNN takes the
  shape (head_dim a multiple of 8, at most 128, or 256 on Hopper), its XLA implementation elsewhere. Only the
  arguments common to jax 0.6.2 and 0.11 are used (bias, mask, scale, is_causal, implementation); a general mask
  is passed as `mask` (cuDNN turns it into a bias), `causal=True` only tells cuDNN it may skip the upper triangle.
- "explicit": einsum + softmax laid out keys-major ([..., S, T], softmax over S). XLA:CPU reduces over a major axis
  with vector instructions and over the minor axis without: measured on the 2-core CPU, MiniLM shape (16 × 128
  tokens, 12 heads of 32), 22 ms vs 39 ms per layer for the queries-major layout that the XLA implementation of
  `jax.nn.dot_product_attention` uses. Soft-capped scores (gemma2's logit softcap) exist only here.
- "auto" (the default): "fused" on a GPU, "explicit" on a CPU and whenever `softcap` is set.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from linalign_jax.errors import LinalignError

IMPLEMENTATIONS = ("auto", "fused", "explicit")
HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def attention(q, k, v, *, scale: float, mask=None, bias=None, causal: bool = False,
              softcap: Optional[float] = None, implementation: str = "auto"):
    """See the module doc. `causal=True` promises that `mask` already hides every key after its query (T == S)."""
    if implementation not in IMPLEMENTATIONS:
        raise LinalignError(f"unknown attention implementation {implementation!r}; "
                            f"expected one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        implementation = "fused" if jax.default_backend() == "gpu" and not softcap else "explicit"
    if implementation == "explicit":
        return explicit_attention(q, k, v, scale=scale, mask=mask, bias=bias, softcap=softcap)
    if softcap:
        raise LinalignError("fused attention has no logit soft-capping; use implementation='explicit'")
    return fused_attention(q, k, v, scale=scale, mask=mask, bias=bias, causal=causal)


def explicit_attention(q, k, v, *, scale: float, mask=None, bias=None, softcap: Optional[float] = None):
    B, T, N, D = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, D)
    scores = jnp.einsum("btkgd,bskd->bkgst", q, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + keys_major(bias, K).astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(keys_major(mask, K), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-2).astype(v.dtype)
    return jnp.einsum("bkgst,bskd->btkgd", probs, v).reshape(B, T, N, D)


def keys_major(x, num_kv_heads: int):
    """[B|1, N|1, T|1, S] -> [B|1, K|1, G|1, S, T|1], the explicit path's score layout."""
    x = jnp.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    b, n, t, s = x.shape
    x = x.reshape(b, 1, 1, t, s) if n == 1 else x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)
    return jnp.swapaxes(x, -1, -2)


def fused_attention(q, k, v, *, scale: float, mask=None, bias=None, causal: bool = False):
    causal = causal and q.shape[1] == k.shape[1]
    if jax.default_backend() == "gpu" and q.dtype in HALF_DTYPES:
        try:
            return _cudnn(q, k, v, scale=scale, mask=mask, bias=bias, causal=causal)
        except NotImplementedError:  # a shape cuDNN's flash kernel does not take (checked while tracing)
            pass
    return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, is_causal=causal, implementation="xla")


def _cudnn(q, k, v, *, scale, mask, bias, causal):
    B, T, N, _ = q.shape
    S = k.shape[1]
    # cuDNN adds the (mask-derived) bias per [T, S] tile: give it full query/key extents, in the input dtype.
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0], mask.shape[1], T, S))
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0], bias.shape[1], T, S)).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, is_causal=causal, implementation="cudnn")
