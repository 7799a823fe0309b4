"""What cross-model generation needs from two tokenizers: token bytes, streamed UTF-8, canonical re-encoding, and the
paper's tokenizer-compatibility metrics.

Hybrid decoding emits *target* tokens but runs the *source* model, so every emitted token must travel
target id → bytes → text → source ids. Three things make that subtle:

* A byte-level token can end inside a multi-byte UTF-8 character (`Utf8Stream` buffers the bytes until they decode;
  `continuation_mask` keeps the target head from emitting bytes that can never decode).
* Re-encoding only the new piece would give a non-canonical source tokenization ("Hel" + "lo" vs "Hello"), a sequence
  the source never saw in training. `SourceTokenFeed` re-encodes the whole text and reports how many committed source
  tokens survive, so the caller rolls its KV cache back to that prefix and feeds only the changed tail.
* Tokenizers store tokens in different notations (GPT-2 byte-level 'Ġthe', SentencePiece '▁the' with '<0xE2>' byte
  fallback); `token_byte_table` reads the decoder from the tokenizer's own JSON and maps every id to its exact bytes.

Metrics, defined precisely because the paper (§3.2.2, Table 3) names but does not define them:

* **vocabulary Jaccard** = |V_A ∩ V_B| / |V_A ∪ V_B| over the raw vocabulary strings (added tokens included), exactly as
  stored, so 'Ġthe' ≠ '▁the'. [inferred] The raw-string reading fits the paper's numbers (every Gemma ↔ byte-level
  pair < 0.07, Qwen ↔ Llama-3 0.643), which a space-normalised comparison would put much higher.
* **exact token match** over a corpus = 2·Σ|T_A ∩ T_B| / Σ(|T_A| + |T_B|), where T_X is the multiset of
  (char start, char end, raw token string) triples of tokenizer X on one text (no special tokens). 1.0 iff both
  tokenize every text identically; symmetric, as in Table 3.
* **boundary match**: the same with (start, end) spans only — the notation-free companion (how often the two split the
  text at the same places).
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
import json
from collections import Counter
from typing import Any, Callable, List, Sequence, Tuple

import jax
import numpy as np
import tokenizers

from linalign_jax.errors import LinalignError

_OFFSET_PROBE = "Offsets probe: the quick brown fox, 42 naïve cafés."


def as_fast_tokenizer(tokenizer: Any, name: str = "tokenizer") -> tokenizers.Tokenizer:
    """Return the `tokenizers.Tokenizer` behind `tokenizer`, checking it reports usable character offsets.

    Accepts a `tokenizers.Tokenizer` or a transformers fast tokenizer (unwrapped via `backend_tokenizer`); anything
    else (a slow tokenizer, a plain callable) has no offsets, and token pairing and re-encoding cannot work without
    them.
    """
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(tok, tokenizers.Tokenizer):
        raise LinalignError(
            f"{name}: {type(tokenizer).__name__} has no character offsets; expected a tokenizers.Tokenizer or a "
            "transformers fast tokenizer")
    enc = tok.encode(_OFFSET_PROBE, add_special_tokens=False)
    ends = [e for (s, e) in enc.offsets]
    valid = (len(ends) > 0 and ends[-1] == len(_OFFSET_PROBE) and all(0 <= s <= e for s, e in enc.offsets)
             and all(a <= b for a, b in zip(ends, ends[1:])))
    if not valid:
        raise LinalignError(
            f"{name}: offsets {enc.offsets[:8]}... do not cover the probe text {_OFFSET_PROBE!r} monotonically; "
            "expected character offsets ending at len(text)")
    return tok


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict:
    """GPT-2's printable stand-in character for every byte (inverse mapping: char → byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _decoder_steps(decoder: dict | None) -> List[dict]:
    if decoder is None:
        return []
    return decoder["decoders"] if decoder["type"] == "Sequence" else [decoder]


def _piece_decoder(steps: Sequence[dict]) -> Callable[[str], bytes]:
    """The per-token effect of a tokenizer's decoder chain: vocabulary string → bytes."""
    kinds = {s["type"] for s in steps}
    if "ByteLevel" in kinds:
        alphabet = _byte_level_alphabet()
        return lambda piece: b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8") for c in piece)
    replacements = [(s["pattern"]["String"], s["content"]) for s in steps if s["type"] == "Replace"]
    replacements += [(s.get("replacement", "▁"), " ") for s in steps if s["type"] == "Metaspace"]
    byte_fallback = "ByteFallback" in kinds

    def decode(piece: str) -> bytes:
        if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        for old, new in replacements:
            piece = piece.replace(old, new)
        return piece.encode("utf-8")

    return decode


_SUPPORTED_DECODER_STEPS = {"ByteLevel", "Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}


@functools.lru_cache(maxsize=8)
def token_byte_table(tokenizer: tokenizers.Tokenizer, vocab_size: int = 0) -> Tuple[bytes, ...]:
    """bytes of every token id when it *continues* a text (special tokens, and ids up to `vocab_size` the tokenizer
    does not define — a model's padded embedding rows — → b"").

    Read from the tokenizer's own decoder config, so byte-level BPE (Llama-3, Qwen, SmolLM2) and SentencePiece with byte
    fallback (Gemma, Mistral) are both exact. A leading-space `Strip` only applies at the start of a whole text, so it
    is ignored here: a generated token always continues a prompt.
    """
    spec = json.loads(tokenizer.to_str())
    steps = _decoder_steps(spec.get("decoder"))
    unsupported = {s["type"] for s in steps} - _SUPPORTED_DECODER_STEPS
    if unsupported or not steps:
        raise LinalignError(
            f"tokenizer decoder {sorted(unsupported) or 'None'} is not supported for streaming generation; expected "
            f"a chain of {sorted(_SUPPORTED_DECODER_STEPS)}")
    special = {t["id"] for t in spec.get("added_tokens", []) if t["special"]}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    decode = _piece_decoder(steps)
    table = [b""] * max(vocab_size, max(vocab.values()) + 1)
    for piece, idx in vocab.items():
        if idx not in special:
            table[idx] = decode(piece)
    return tuple(table)


def _utf8_lead_length(byte: int) -> int:
    """Length of the UTF-8 sequence a lead byte starts; 0 for a continuation byte; 1 for ASCII or an invalid byte."""
    if 0x80 <= byte < 0xC0:
        return 0
    if 0xC2 <= byte < 0xE0:
        return 2
    if 0xE0 <= byte < 0xF0:
        return 3
    if 0xF0 <= byte < 0xF5:
        return 4
    return 1


class Utf8Stream:
    """Turns a stream of token bytes into text, holding back an incomplete UTF-8 character until it completes.

    Invalid sequences become U+FFFD (they can never complete). `needed` is how many continuation bytes the held-back
    character still lacks (0 when nothing is pending).
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data)

    @property
    def needed(self) -> int:
        pending, _ = self._decoder.getstate()
        if not pending:
            return 0
        return max(_utf8_lead_length(pending[0]) - len(pending), 0)

    def flush(self) -> str:
        """Text of whatever is still held back (as U+FFFD): the stream ended inside a character."""
        return self._decoder.decode(b"", final=True)


@dataclasses.dataclass(frozen=True)
class ContinuationTable:
    """Per-token counts that say which tokens may follow a partial UTF-8 character (see `continuation_mask`)."""

    leading_continuation: np.ndarray  # int32 [V]: continuation bytes (0x80-0xBF) at the start of the token's bytes
    num_bytes: np.ndarray              # int32 [V]: len(bytes); 0 for special tokens

    @classmethod
    def from_byte_table(cls, table: Sequence[bytes]) -> "ContinuationTable":
        lead = np.zeros(len(table), np.int32)
        for i, b in enumerate(table):
            n = 0
            while n < len(b) and 0x80 <= b[n] < 0xC0:
                n += 1
            lead[i] = n
        return cls(lead, np.array([len(b) for b in table], np.int32))


jax.tree_util.register_dataclass(ContinuationTable, data_fields=["leading_continuation", "num_bytes"], meta_fields=[])


def continuation_mask(table: ContinuationTable, needed) -> Any:
    """Boolean [V]: tokens whose bytes are valid after a character that still lacks `needed` continuation bytes.

    needed == 0: any token not starting with a stray continuation byte (special tokens included).
    needed == k > 0: tokens that complete the character exactly (k leading continuation bytes, then a non-continuation
    byte or the end), or that consist only of fewer than k continuation bytes. Works on numpy or traced jax ints.
    """
    lead, size = table.leading_continuation, table.num_bytes
    complete = lead == needed  # `lead` counts the maximal run, so the byte after it is not a continuation byte
    partial = (lead == size) & (size > 0) & (size < needed)
    return complete | (needed > 0) & partial


class SourceTokenFeed:
    """Keeps the source model's token ids canonical for a growing text.

    `update(text)` re-encodes the full text with the source tokenizer and returns (keep, new_ids): the first `keep`
    committed ids are unchanged, the rest must be dropped from the KV cache and `new_ids` fed in their place. Usually
    keep == len(committed) and new_ids is one token; at a merge boundary ("Hel" + "lo") keep is smaller.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, add_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.ids: List[int] = []
        self.text = ""

    def update(self, text: str) -> Tuple[int, List[int]]:
        if not text.startswith(self.text):
            raise LinalignError(f"source text may only grow; got {text[:40]!r}... after {self.text[:40]!r}...")
        if text == self.text and self.ids:
            return len(self.ids), []
        ids = self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids
        keep = 0
        limit = min(len(ids), len(self.ids))
        while keep < limit and ids[keep] == self.ids[keep]:
            keep += 1
        if keep == len(ids):
            # The text grew but encodes to a prefix of what was committed (cannot happen for prefix-stable
            # tokenizers); re-feed the last token so the caller gets a fresh final state.
            keep -= 1
        self.ids, self.text = ids, text
        return keep, ids[keep:]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer-compatibility metrics (paper §3.2.2 / Table 3)


@dataclasses.dataclass(frozen=True)
class TokenizerCompatibility:
    vocab_jaccard: float
    exact_token_match: float
    boundary_match: float
    vocab_sizes: Tuple[int, int]
    num_tokens: Tuple[int, int]
    num_texts: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def vocab_jaccard(tok_a: tokenizers.Tokenizer, tok_b: tokenizers.Tokenizer) -> float:
    va = set(tok_a.get_vocab(with_added_tokens=True))
    vb = set(tok_b.get_vocab(with_added_tokens=True))
    return len(va & vb) / len(va | vb)


def tokenizer_compatibility(tok_a: tokenizers.Tokenizer, tok_b: tokenizers.Tokenizer,
                            texts: Sequence[str]) -> TokenizerCompatibility:
    """Vocabulary Jaccard, exact token match and boundary match (module docstring) over `texts`."""
    tok_a, tok_b = as_fast_tokenizer(tok_a, "tokenizer A"), as_fast_tokenizer(tok_b, "tokenizer B")
    texts = [t for t in texts if t]
    if not texts:
        raise LinalignError("tokenizer_compatibility needs at least one non-empty text")
    enc_a = tok_a.encode_batch(texts, add_special_tokens=False)
    enc_b = tok_b.encode_batch(texts, add_special_tokens=False)
    exact = spans = count_a = count_b = 0
    for ea, eb in zip(enc_a, enc_b):
        # Multisets: byte-level pieces of one character share its offsets.
        exact += sum((Counter(zip(ea.offsets, ea.tokens)) & Counter(zip(eb.offsets, eb.tokens))).values())
        spans += sum((Counter(ea.offsets) & Counter(eb.offsets)).values())
        count_a += len(ea.ids)
        count_b += len(eb.ids)
    total = count_a + count_b
    return TokenizerCompatibility(
        vocab_jaccard=vocab_jaccard(tok_a, tok_b), exact_token_match=2 * exact / total,
        boundary_match=2 * spans / total,
        vocab_sizes=(tok_a.get_vocab_size(with_added_tokens=True), tok_b.get_vocab_size(with_added_tokens=True)),
        num_tokens=(count_a, count_b), num_texts=len(texts))
