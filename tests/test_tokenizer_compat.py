"""Token bytes, streamed UTF-8, canonical re-encoding and the compatibility metrics on the real SmolLM2 (byte-level BPE)
and gemma-3-270m (SentencePiece with byte fallback) tokenizers."""
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from linalign_jax import tokenizer_compat as tc
from linalign_jax.assets import resolve_model
from linalign_jax.errors import LinalignError
from linalign_jax.models import gguf
from linalign_jax.models.tokenizer import load_tokenizer

TEXTS = [
    "Hello world, café 🙂 naïve 東京!",
    "  x\n\ty <h1>Title</h1>  e\u0301 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 12345678 tabs\t\tend ",
    "The quick brown fox jumps over the lazy dog.",
    "Привет, мир! مرحبا 👩‍👩‍👧 ½ ≥ ∑",
]


@pytest.fixture(scope="module", params=["SmolLM2-135M-Instruct", "gemma-3-270m"])
def tokenizer(request):
    return load_tokenizer(gguf.materialize(resolve_model(request.param)))


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(gguf.materialize(resolve_model("SmolLM2-135M-Instruct")))


@pytest.fixture(scope="module")
def gemma():
    return load_tokenizer(gguf.materialize(resolve_model("gemma-3-270m")))


def test_token_bytes_reassemble_every_text(tokenizer):
    table = tc.token_byte_table(tokenizer)
    assert len(table) >= tokenizer.get_vocab_size(with_added_tokens=True)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")
        stream = tc.Utf8Stream()
        assert "".join(stream.push(table[i]) for i in ids) == text and stream.needed == 0


def test_special_tokens_have_no_bytes(tokenizer):
    table = tc.token_byte_table(tokenizer)
    bos_like = [i for i in tokenizer.encode("a", add_special_tokens=True).ids
                if i not in tokenizer.encode("a", add_special_tokens=False).ids]
    for token in ("<eos>", "<bos>", "<|endoftext|>", "<|im_end|>"):
        if tokenizer.token_to_id(token) is not None:
            assert table[tokenizer.token_to_id(token)] == b""
    assert all(table[i] == b"" for i in bos_like)


def test_byte_level_pieces_of_one_character_are_held_back(smol):
    """SmolLM2 splits 東 into byte-level pieces; the stream emits the character only once all its bytes arrived."""
    table = tc.token_byte_table(smol)
    ids = smol.encode(" 東", add_special_tokens=False).ids
    assert len(ids) > 1
    stream, out, needed = tc.Utf8Stream(), [], []
    for i in ids:
        out.append(stream.push(table[i]))
        needed.append(stream.needed)
    assert "".join(out) == " 東" and all(piece in ("", " ", " 東", "東") for piece in out)
    assert needed[-1] == 0 and max(needed) > 0


def test_utf8_stream_counts_missing_bytes_and_replaces_invalid_ones():
    stream = tc.Utf8Stream()
    assert stream.push(b"a\xf0\x9f") == "a" and stream.needed == 2
    assert stream.push(b"\x99") == "" and stream.needed == 1
    assert stream.push(b"\x82b") == "🙂b" and stream.needed == 0
    assert stream.push(b"\xc3") == "" and stream.needed == 1
    assert stream.push(b"x") == "\ufffdx"  # a lead byte followed by a non-continuation byte can never complete
    assert stream.push(b"\xe6") == "" and stream.flush() == "\ufffd"


def test_continuation_mask():
    table = tc.ContinuationTable.from_byte_table(
        [b"a", b"\xc3", b"\xa9", b"\xa9b", b"\x80\x80", b"", b"\xa9\xa9\xa9", b"\xe6\x9d"])
    allowed = lambda needed: np.flatnonzero(tc.continuation_mask(table, needed)).tolist()  # noqa: E731
    assert allowed(0) == [0, 1, 5, 7]        # no stray continuation byte at the start; special tokens allowed
    assert allowed(1) == [2, 3]              # exactly one continuation byte, then anything
    assert allowed(2) == [2, 4]              # a partial continuation, or exactly two
    assert allowed(3) == [2, 4, 6]


def test_source_feed_stays_canonical_and_reports_the_common_prefix(smol):
    text = "Hello naïve world, 東京 tokenization boundaries!"
    feed = tc.SourceTokenFeed(smol)
    cuts = list(range(1, len(text) + 1))  # grow one character at a time: the worst case for merges
    rollbacks = 0
    for end in cuts:
        before = list(feed.ids)
        keep, new = feed.update(text[:end])
        assert feed.ids == smol.encode(text[:end]).ids
        assert before[:keep] == feed.ids[:keep] and feed.ids[keep:] == new and new
        rollbacks += keep < len(before)
    assert rollbacks > 0  # "Hel" -> "Hell" -> "Hello" re-merges the last token
    assert feed.update(text) == (len(feed.ids), [])
    with pytest.raises(LinalignError, match="only grow"):
        feed.update("Goodbye")


def test_compatibility_metrics(smol, gemma):
    same = tc.tokenizer_compatibility(smol, smol, TEXTS)
    assert (same.vocab_jaccard, same.exact_token_match, same.boundary_match) == (1.0, 1.0, 1.0)
    ab = tc.tokenizer_compatibility(smol, gemma, TEXTS)
    ba = tc.tokenizer_compatibility(gemma, smol, TEXTS)
    assert ab.vocab_jaccard == pytest.approx(ba.vocab_jaccard)
    assert ab.exact_token_match == pytest.approx(ba.exact_token_match)
    # 'Ġthe' vs '▁the': the notations differ, so raw strings rarely agree while the split points often do.
    assert 0.0 < ab.vocab_jaccard < 0.2
    assert 0.0 < ab.exact_token_match < ab.boundary_match < 1.0
    assert ab.num_texts == len(TEXTS) and ab.num_tokens[0] == sum(len(smol.encode(t, add_special_tokens=False).ids)
                                                                 for t in TEXTS)


def test_metric_definition_on_a_hand_computed_case():
    """Two word-level tokenizers over one text: spans match on 'a' and 'b', strings only on 'a'."""
    def word_level(vocab, pre):
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre
        return tok
    whitespace = tokenizers.pre_tokenizers.WhitespaceSplit()
    a = word_level({"[UNK]": 0, "a": 1, "b": 2, "cd": 3}, whitespace)
    b = word_level({"[UNK]": 0, "a": 1, "B": 2, "c": 3, "d": 4}, tokenizers.pre_tokenizers.Sequence(
        [whitespace, tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), "isolated")]))
    # text "a b cd": A = {a(0,1), b(2,3), cd(4,6)}; B = {a(0,1), [UNK](2,3) 'b' unknown, c(4,5), d(5,6)}
    result = tc.tokenizer_compatibility(a, b, ["a b cd"])
    assert result.vocab_jaccard == pytest.approx(2 / 7)             # {[UNK], a} of {[UNK], a, b, cd, B, c, d}
    assert result.exact_token_match == pytest.approx(2 * 1 / 7)     # only (0,1,'a') agrees; 3 + 4 tokens
    assert result.boundary_match == pytest.approx(2 * 2 / 7)        # spans (0,1) and (2,3)


def test_bad_tokenizers_are_errors(smol):
    with pytest.raises(LinalignError, match="no character offsets"):
        tc.as_fast_tokenizer(object(), "source tokenizer")
    from transformers import PreTrainedTokenizerFast
    assert tc.as_fast_tokenizer(PreTrainedTokenizerFast(tokenizer_object=smol)) is not None
    fixture = Path(__file__).parent / "fixtures" / "decoders" / "llama_gqa" / "tokenizer.json"
    with pytest.raises(LinalignError, match="not supported for streaming"):
        tc.token_byte_table(tokenizers.Tokenizer.from_file(str(fixture)))  # WordLevel, no decoder
    with pytest.raises(LinalignError, match="at least one non-empty"):
        tc.tokenizer_compatibility(smol, smol, ["", ""])
