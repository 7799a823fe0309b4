"""Tokenizers: `tokenizer.json` from a model directory, or one built from a GGUF file's metadata.

GGUF files carry their vocabulary (tokens, scores, merges) rather than a `tokenizer.json`. Byte-level BPE files
(`tokenizer.ggml.model == "gpt2"`, e.g. SmolLM2) go through transformers' GGUF converter (the one piece of
transformers used at run time; no torch). Gemma files list no merges, and that converter approximates them with a
Unigram model, which segments differently from the real Gemma tokenizer; we rebuild Gemma's SentencePiece BPE
instead, with merges recovered from the vocabulary in file order (the order Gemma's merges follow), as transformers 5
does. Then, for every file: control tokens become special tokens and user-defined ones added tokens (so they are
never split), and BOS/EOS post-processing follows the file's own `add_bos_token` / `add_eos_token`, as in llama.cpp.
The result is saved as tokenizer.json next to the materialised weights, so conversion happens once per file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from linalign_jax.errors import LinalignError

TOKENIZER_FILE = "tokenizer.json"
# GGUF metadata key (under "tokenizer.ggml.") -> field name transformers' converters expect.
GGUF_TOKENIZER_FIELDS = {
    "model": "tokenizer_type", "tokens": "tokens", "scores": "scores", "token_type": "token_type",
    "merges": "merges", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id", "add_space_prefix": "add_prefix_space",
}
# GGUF architecture -> the transformers converter family (byte-level BPE vocabularies).
CONVERTER_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GEMMA_ARCHS = ("gemma3",)
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def load_tokenizer(model_dir: str | Path) -> tokenizers.Tokenizer:
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.exists():
        raise LinalignError(f"{model_dir}: no {TOKENIZER_FILE} (a fast tokenizer is needed for character offsets)")
    return tokenizers.Tokenizer.from_file(str(path))


def tokenizer_from_gguf(metadata: Dict[str, Any], architecture: str) -> tokenizers.Tokenizer:
    """A fast tokenizer from GGUF metadata (`gguf_metadata` values, keys with their full dotted names)."""
    from transformers.integrations.ggml import convert_gguf_tokenizer

    fields = {GGUF_TOKENIZER_FIELDS[k[len("tokenizer.ggml."):]]: v for k, v in metadata.items()
              if k.startswith("tokenizer.ggml.") and k[len("tokenizer.ggml."):] in GGUF_TOKENIZER_FIELDS}
    if "tokens" not in fields:
        raise LinalignError("GGUF file has no tokenizer.ggml.tokens: it does not embed a tokenizer")
    if architecture in GEMMA_ARCHS:
        tokenizer = gemma_tokenizer(fields)
    elif architecture in CONVERTER_ARCH:
        tokenizer, _ = convert_gguf_tokenizer(CONVERTER_ARCH[architecture], fields)
    else:
        raise LinalignError(f"no GGUF tokenizer converter for architecture {architecture!r}; "
                            f"supported: {', '.join((*CONVERTER_ARCH, *GEMMA_ARCHS))}")
    _add_special_tokens(tokenizer, fields)
    _set_post_processor(tokenizer, fields, add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
                        add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)))
    return tokenizer


def gemma_tokenizer(fields: Dict[str, Any]) -> tokenizers.Tokenizer:
    """Gemma's SentencePiece BPE (byte fallback, spaces as U+2581) from a vocabulary without merges."""
    # Tokens made of spaces are stored as real spaces; the model sees them as U+2581 runs.
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in fields["tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = fields.get("unk_token_id")
    tokenizer = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges_in_vocab_order(tokens), fuse_unk=True, byte_fallback=True,
        unk_token=tokens[unk] if unk is not None else None))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def merges_in_vocab_order(tokens) -> list:
    """Every split of a token into two vocabulary tokens, ranked by the merged token's position in the file."""
    index = {t: i for i, t in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in index and token[k:] in index]
        pairs.sort(key=lambda p: (index[p[0]], index[p[1]]))
        merges.extend((rank, len(left), len(right), left, right) for left, right in pairs)
    merges.sort(key=lambda m: (m[0], -m[1], -m[2]))
    return [(left, right) for *_, left, right in merges]


def _add_special_tokens(tokenizer: tokenizers.Tokenizer, fields: Dict[str, Any]) -> None:
    """Control tokens (e.g. <|im_start|>, <start_of_turn>) become special, user-defined ones added: never split."""
    types = fields.get("token_type") or ()
    vocab = tokenizer.get_vocab()
    control = [t for t, kind in zip(fields["tokens"], types) if kind == CONTROL and t in vocab]
    user = [t for t, kind in zip(fields["tokens"], types) if kind == USER_DEFINED and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _set_post_processor(tokenizer: tokenizers.Tokenizer, fields: Dict[str, Any], add_bos: bool, add_eos: bool) -> None:
    tokens = fields["tokens"]

    def special(key: str) -> Optional[tuple]:
        idx = fields.get(key)
        return (tokens[idx], idx) if idx is not None and 0 <= idx < len(tokens) else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    single, pair, specials = "$A", "$A $B:1", []
    if add_bos and bos:
        single, pair = f"{bos[0]} {single}", f"{bos[0]} $A {bos[0]}:1 $B:1"
        specials.append(bos)
    if add_eos and eos:
        single, pair = f"{single} {eos[0]}", f"{pair} {eos[0]}:1"
        specials.append(eos)
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    current = tokenizer.post_processor
    # Byte-level BPE needs its offset-trimming ByteLevel processor kept in front of the template.
    if isinstance(current, processors.ByteLevel) or (
            isinstance(current, processors.Sequence) and "ByteLevel" in repr(current)):
        tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    else:
        tokenizer.post_processor = template
