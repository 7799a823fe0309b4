"""Teacher-forced next-token metrics of hybrid decoding against the native target (paper §6.9: top-1 agreement,
perplexity degradation), computed in batches rather than one decode step per token.

Positions are fixed by the target's tokenization of each held-out text: for every real target token t_k (k ≥ 1) the
context is the text up to the end of t_{k-1} — up to its last complete character, as a hybrid decoder would hold it
(the hybrid head is then restricted to tokens that can complete that character, as in decoding; the native head is
scored under the same mask, so both distributions are normalised over the same tokens).
* native: the target's own state at t_{k-1} (one batched forward pass per text batch);
* hybrid: the source's last state on the *canonical* source encoding of that context — exactly what a `HybridRows` row holds
  at that point of a generation. Where that encoding is a prefix of the source's encoding of the whole text (the common
  case), the state comes from the whole-text pass (causal attention makes them equal); the remaining contexts (a target
  boundary inside a source token) are run on their own, batched.
Both are decoded by the target head; the hybrid through the affine map.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linalign_jax import tokenizer_compat
from linalign_jax.errors import LinalignError
from linalign_jax.features import extract_features
from linalign_jax.generate.hybrid import HybridPair
from linalign_jax.io_utils import Progress

HEAD_CHUNK = 64  # rows per head call: 64 x 262k float32 logits = 67 MB


@functools.lru_cache(maxsize=None)
def _head_scores(head_fn, masked: bool):
    """jit: states [n, d], true tokens [n] (, missing UTF-8 bytes [n]) → (argmax [n], log p(true token) [n])."""

    def run(params, states, tokens, continuation, needed):
        logits = head_fn(params, states).astype(jnp.float32)
        if masked:
            allowed = jax.vmap(lambda n: tokenizer_compat.continuation_mask(continuation, n))(needed)
            logits = jnp.where(allowed, logits, -jnp.inf)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.argmax(logp, -1), jnp.take_along_axis(logp, tokens[:, None], -1)[:, 0]

    return jax.jit(run)


def head_scores(model, states: np.ndarray, tokens: np.ndarray, continuation=None, needed=None):
    """(argmax, log p(token)) of `model`'s head on `states`, in fixed-size chunks (one compilation). With
    `continuation` and `needed`, tokens that would leave invalid UTF-8 are masked as in hybrid decoding."""
    run = _head_scores(model.lm_head_fn, continuation is not None)
    needed = np.zeros(len(tokens), np.int32) if needed is None else np.asarray(needed, np.int32)
    argmax, logprob = [], []
    for begin in range(0, len(states), HEAD_CHUNK):
        rows = states[begin:begin + HEAD_CHUNK]
        pad = HEAD_CHUNK - len(rows)
        chunk = lambda a: np.pad(a[begin:begin + HEAD_CHUNK], [(0, pad)] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
        a, lp = run(model.params, chunk(states), chunk(tokens.astype(np.int32)), continuation, chunk(needed))
        argmax.append(np.asarray(a)[:len(rows)])
        logprob.append(np.asarray(lp)[:len(rows)])
    return np.concatenate(argmax), np.concatenate(logprob)


def next_token_scores(pair: HybridPair, texts: Sequence[str], *, max_tokens: int = 64,
                      batch_size: int = 16) -> Dict[str, np.ndarray]:
    """Per scored position: "context" (text), "token" (true next target id), native/hybrid "argmax" and "logprob"
    of the true token, "reused" (the hybrid state came from the whole-text pass)."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise LinalignError("next_token_metrics needs at least one non-blank held-out text")
    source, target = pair.source, pair.target
    tgt = extract_features(target, texts, pooling="tokens", max_length=max_tokens, batch_size=batch_size,
                           progress=False)
    src_max = 4 * max_tokens  # source tokenizations may be longer than the target's
    src = extract_features(source, texts, pooling="tokens", max_length=src_max, batch_size=batch_size, progress=False)

    native_states, tokens, all_contexts, needed, contexts, source_rows = [], [], [], [], [], []
    reused: List[np.ndarray] = []
    for i, text in enumerate(texts):
        real = np.flatnonzero(~tgt.special[i])
        full_ids = list(src.token_ids[i])
        ids_t = tgt.token_ids[i]
        # The context is what the hybrid's source would have read: the target tokens' bytes so far, up to the last
        # complete character (a byte-level target token can end inside one).
        stream = tokenizer_compat.Utf8Stream()
        context = text[:int(tgt.offsets[i][real[0], 0])] + stream.push(pair.byte_table[ids_t[real[0]]])
        for k in real[1:]:
            if not context:  # the text opens with a partial character: nothing for the source to read yet
                context += stream.push(pair.byte_table[ids_t[k]])
                continue
            all_contexts.append(context)
            needed.append(stream.needed)
            native_states.append(tgt.states[i][k - 1])
            tokens.append(int(tgt.token_ids[i][k]))
            ids = source.tokenizer.encode(context).ids
            if full_ids[:len(ids)] == ids:
                reused.append(src.states[i][len(ids) - 1])
                source_rows.append(("reused", len(reused) - 1))
            else:
                contexts.append(context)
                source_rows.append(("own", len(contexts) - 1))
            context += stream.push(pair.byte_table[ids_t[k]])
    if not tokens:
        raise LinalignError("held-out texts give no scorable positions (each needs >= 2 real target tokens)")
    own = (extract_features(source, contexts, pooling="last", max_length=src_max, batch_size=batch_size,
                            progress=False).array if contexts else np.zeros((0, source.hidden_size), np.float32))
    hybrid_states = np.stack([reused[j] if kind == "reused" else own[j] for kind, j in source_rows])
    tokens = np.asarray(tokens, np.int32)

    progress = Progress("next-token scores", total=2 * len(tokens), unit="positions")
    native_top, native_lp = head_scores(target, np.stack(native_states), tokens, pair.continuation, needed)
    progress.update(len(tokens))
    mapped = np.asarray(pair.affine(jnp.asarray(hybrid_states)))
    hybrid_top, hybrid_lp = head_scores(target, mapped, tokens, pair.continuation, needed)
    progress.update(len(tokens))
    progress.close()
    return {"context": np.asarray(all_contexts, object), "token": tokens, "native_argmax": native_top,
            "native_logprob": native_lp, "hybrid_argmax": hybrid_top, "hybrid_logprob": hybrid_lp,
            "reused": np.asarray([kind == "reused" for kind, _ in source_rows]), "needed": np.asarray(needed)}


def summarize(scores: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Top-1 agreement of hybrid vs native target, each one's top-1 accuracy, perplexities and the degradation (%)."""
    native_ppl = float(np.exp(-scores["native_logprob"].mean()))
    hybrid_ppl = float(np.exp(-scores["hybrid_logprob"].mean()))
    return {
        "positions": int(len(scores["token"])),
        "top1_agreement": float((scores["hybrid_argmax"] == scores["native_argmax"]).mean()),
        "native_top1_accuracy": float((scores["native_argmax"] == scores["token"]).mean()),
        "hybrid_top1_accuracy": float((scores["hybrid_argmax"] == scores["token"]).mean()),
        "native_perplexity": native_ppl, "hybrid_perplexity": hybrid_ppl,
        "perplexity_degradation_pct": 100.0 * (hybrid_ppl - native_ppl) / native_ppl,
        "contexts_reused_from_whole_text": float(scores["reused"].mean()),
    }
