"""Generation: KV-cache decoding loop, sampling, stop conditions, hybrid decoding and token-map fitting.

Mechanics run on tiny random decoders (the llama_gqa and gemma3_sliding fixture configs) that carry the real SmolLM2 and
gemma-3-270m tokenizers, so byte-level BPE, byte fallback and re-encoding are exercised for real; the greedy
continuations are checked on the real checkpoints against transformers (tests/fixtures/real, make_fixtures.py).
"""
import codecs
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linalign_jax.align.maps import AffineMap, save_map
from linalign_jax.assets import resolve_model
from linalign_jax.errors import LinalignError
from linalign_jax.generate import HybridPair, SamplingConfig, generate, generate_batch
from linalign_jax.generate.decoding import CacheRows
from linalign_jax.generate.evaluation import next_token_scores, summarize
from linalign_jax.generate.hybrid import HybridRows, load_pair_map
from linalign_jax.generate.sampling import sample_logits, top_p_filter
from linalign_jax.generate.token_map import fit_token_map, fit_token_maps
from linalign_jax.models import core, decoder_model, gguf, load_model
from linalign_jax.models.tokenizer import load_tokenizer
from linalign_jax.shapes import MIN_SEQUENCE, bucket
from linalign_jax import tokenizer_compat

FIXTURES = Path(__file__).parent / "fixtures"
REAL = ["SmolLM2-135M-Instruct", "gemma-3-270m"]


def tiny_decoder(fixture: str, tokenizer_of: str, seed: int):
    """A random decoder shaped like a fixture config, with a real model's tokenizer and vocabulary size."""
    tokenizer = load_tokenizer(gguf.materialize(resolve_model(tokenizer_of)))
    config = dataclasses.replace(load_model(str(FIXTURES / "decoders" / fixture)).config,
                                 vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
                                 max_position_embeddings=4096)
    params = core.init_params(config, jax.random.key(seed))
    return decoder_model(config, params, tokenizer, spec=f"tiny-{fixture}", fingerprint=f"tiny-{fixture}-{seed}")


@pytest.fixture(scope="module")
def smol_tiny():
    return tiny_decoder("llama_gqa", "SmolLM2-135M-Instruct", 1)


@pytest.fixture(scope="module")
def gemma_tiny():
    return tiny_decoder("gemma3_sliding", "gemma-3-270m", 2)


def full_logits(model, ids):
    ids = jnp.asarray([ids], jnp.int32)
    hidden = model.forward(model.params, ids, jnp.ones_like(ids)).last_hidden_state
    return np.asarray(model.lm_head(model.params, hidden)[0])


def full_hidden(model, ids):
    ids = jnp.asarray([ids], jnp.int32)
    return np.asarray(model.forward(model.params, ids, jnp.ones_like(ids)).last_hidden_state[0])


# ------------------------------------------------------------------------------------------- native decoding

@pytest.mark.parametrize("name", REAL)
def test_greedy_continuations_match_transformers(name):
    reference = json.loads((FIXTURES / "real" / f"{name}.json").read_text())
    model = load_model(name)
    for case in reference["greedy"][:2]:  # 2 of the 5 prompts: one real-size decode step is slow on a shared CPU
        assert model.tokenizer.encode(case["prompt"]).ids == case["prompt_ids"]
        result = generate(model, case["prompt"], max_new_tokens=len(case["new_ids"]), eos_ids=())
        assert result.token_ids == case["new_ids"], case["prompt"]
        assert result.text == model.tokenizer.decode(case["new_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("which", ["smol_tiny", "gemma_tiny"])
def test_per_step_logits_equal_the_full_forward_pass(which, request):
    """Prompt of 20 tokens (bucket 32) and 30 steps: the gemma3 config's sliding window (4) is far exceeded."""
    model = request.getfixturevalue(which)
    prompt = "Linear maps between the hidden states of two language models, naïvely 東京."
    result = generate(model, prompt, max_new_tokens=30, eos_ids=(), record_logits=True)
    prompt_ids = model.tokenizer.encode(prompt).ids
    full = full_logits(model, prompt_ids + result.token_ids)
    steps = full[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(result.token_ids)]
    assert result.logits.shape == steps.shape
    np.testing.assert_allclose(result.logits, steps, atol=1e-4, rtol=1e-4)
    assert result.token_ids == steps.argmax(-1).tolist()


def test_cache_rows_roll_back_compact_and_grow_independently(smol_tiny):
    """Three rows of different lengths: rows read different numbers of tokens per step, roll back by different
    amounts, and write more slots than the cache ends up with (holes squeezed out by compaction) after it grew once;
    every row's state equals a fresh forward pass of its tokens, and so does a row that only waited."""
    tok = smol_tiny.tokenizer
    seqs = [tok.encode("one two three four five six").ids, tok.encode("a").ids, tok.encode("naïve cafés").ids]
    rows = CacheRows(smol_tiny, batch_size=3, capacity=17)
    assert rows.cache.max_length == 32
    rows.prefill([s[:3] for s in seqs])
    rows.feed_queues({0: seqs[0][3:], 2: seqs[2][3:]})
    rows.truncate({0: 4, 2: 2})
    kept = [seqs[0][:4], seqs[1], seqs[2][:2]]
    extra = [tok.encode(" alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
                        "sigma tau upsilon phi chi psi omega").ids,
             tok.encode(" b c d e f g h i j k l m n o p q r s t u").ids, tok.encode(" 東京 again and again").ids]
    rows.feed_queues({0: extra[0], 2: extra[2]})  # row 0 outgrows 32 slots: compaction is not enough, it grows
    rows.feed_queues({1: extra[1]})               # rows 0 and 2 wait (holes); compaction keeps 64 slots
    writes = 16 + max(len(seqs[0]), len(seqs[2])) - 3 + max(len(extra[0]), len(extra[2])) + len(extra[1])
    assert len(kept[0] + extra[0]) > 32 and writes > 64 and rows.cache.max_length == 64
    for i in range(3):
        assert rows.counts[i] == len(kept[i] + extra[i])
        np.testing.assert_allclose(np.asarray(rows.hidden[i]), full_hidden(smol_tiny, kept[i] + extra[i])[-1],
                                   atol=1e-5)


PROMPTS = ["The weather today", "Once upon a time, in a small village by the sea, there lived",
           "Linear maps between the hidden states of two language models, naïvely 東京.", "Hi"]


@pytest.mark.parametrize("which", ["smol_tiny", "gemma_tiny"])
def test_batched_greedy_equals_one_at_a_time(which, request):
    """Four prompts of different lengths, batches of 3 (the second batch has two filler rows), stop strings and
    EOS finishing rows early: every row equals decoding its prompt alone."""
    model = request.getfixturevalue(which)
    kwargs = dict(max_new_tokens=20, eos_ids=(), record_logits=True)
    alone = [generate(model, p, **kwargs) for p in PROMPTS]
    batched = generate_batch(model, PROMPTS, batch_size=3, **kwargs)
    for a, b in zip(alone, batched):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    eos = alone[1].token_ids[5]
    stop = alone[0].text[4:7]
    stopped = generate_batch(model, PROMPTS, batch_size=4, max_new_tokens=20, eos_ids=(eos,), stop_strings=[stop])
    for p, b in zip(PROMPTS, stopped):
        assert b.token_ids == generate(model, p, max_new_tokens=20, eos_ids=(eos,), stop_strings=[stop]).token_ids
    assert stopped[1].finish_reason == "eos" and stopped[0].finish_reason == "stop"


def test_batched_sampling_does_not_depend_on_the_batching(smol_tiny):
    cfg, key = SamplingConfig(temperature=1.0, top_p=0.9), jax.random.key(3)
    a = generate_batch(smol_tiny, PROMPTS, max_new_tokens=8, sampling=cfg, key=key, batch_size=4)
    b = generate_batch(smol_tiny, PROMPTS, max_new_tokens=8, sampling=cfg, key=key, batch_size=2)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({tuple(r.token_ids) for r in a}) == len(PROMPTS)


@pytest.mark.parametrize("name", REAL)
def test_batched_greedy_on_the_real_models_matches_transformers(name):
    """All five reference prompts (5-14 tokens) in one batch: each row gives transformers' own greedy tokens."""
    reference = json.loads((FIXTURES / "real" / f"{name}.json").read_text())
    cases = reference["greedy"]
    model = load_model(name)
    results = generate_batch(model, [c["prompt"] for c in cases], max_new_tokens=16, eos_ids=(), batch_size=5)
    for case, result in zip(cases, results):
        assert result.token_ids == case["new_ids"], case["prompt"]


def test_stop_strings_and_eos(smol_tiny):
    prompt = "Once upon a time"
    free = generate(smol_tiny, prompt, max_new_tokens=12, eos_ids=())
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    eos = generate(smol_tiny, prompt, max_new_tokens=12, eos_ids=(free.token_ids[3],))
    first = free.token_ids.index(free.token_ids[3])
    assert eos.finish_reason == "eos" and eos.token_ids == free.token_ids[:first]
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    stopped = generate(smol_tiny, prompt, max_new_tokens=12, eos_ids=(), stop_strings=("\u2603", stop))
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.index(stop)]


def test_sampling_is_reproducible_and_top_p_narrows_to_greedy(smol_tiny):
    prompt, cfg = "The weather today", SamplingConfig(temperature=1.5, top_p=0.95)
    a = generate(smol_tiny, prompt, max_new_tokens=8, sampling=cfg, key=jax.random.key(7))
    b = generate(smol_tiny, prompt, max_new_tokens=8, sampling=cfg, key=jax.random.key(7))
    c = generate(smol_tiny, prompt, max_new_tokens=8, sampling=cfg, key=jax.random.key(8))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = generate(smol_tiny, prompt, max_new_tokens=8)
    nucleus = generate(smol_tiny, prompt, max_new_tokens=8, sampling=SamplingConfig(1.0, 1e-6), key=jax.random.key(0))
    assert nucleus.token_ids == greedy.token_ids


def test_sampling_distribution():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(temperature=1.0)))(keys)
    np.testing.assert_allclose(np.bincount(np.asarray(draw), minlength=4) / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    nucleus = jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(1.0, 0.7)))(keys)
    np.testing.assert_allclose(np.bincount(np.asarray(nucleus), minlength=4) / 20000, [0.625, 0.375, 0, 0], atol=0.015)
    allowed = jnp.asarray([False, True, True, True])
    assert int(sample_logits(logits, None, SamplingConfig(), allowed)) == 1


# -------------------------------------------------------------------------------------------- hybrid decoding

def test_hybrid_source_cache_always_holds_the_canonical_encoding(smol_tiny, gemma_tiny):
    """Feed gemma-tokenized texts into a SmolLM2-tokenized source and the reverse, one target token per row and
    step, two rows with different texts: after every step each row's source holds exactly its own tokenization of
    its text so far, and its state equals a fresh full forward pass — through merges that need a rollback (rows
    rolling back while the other does not) and byte-level pieces of one character."""
    texts = ["Hello naïvely, 東京 tokenization 🙂 boundaries: don't re-merge!", "Short 東京 one; naïvely."]
    for source, target in ((smol_tiny, gemma_tiny), (gemma_tiny, smol_tiny)):
        table = tokenizer_compat.token_byte_table(target.tokenizer)
        target_ids = [target.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        body = HybridRows(source, ["Q:", "A longer prompt:"], batch_size=2, max_new_tokens=4)
        streams = [tokenizer_compat.Utf8Stream(), tokenizer_compat.Utf8Stream()]
        for step in range(max(map(len, target_ids))):
            tokens = {row: (ids[step], streams[row].push(table[ids[step]]))
                      for row, ids in enumerate(target_ids) if step < len(ids)}
            body.advance(tokens)
            for row in tokens:
                assert body.feeds[row].ids == source.tokenizer.encode(body.texts[row]).ids
        assert body.texts == ["Q:" + texts[0], "A longer prompt:" + texts[1]]
        for row in range(2):
            np.testing.assert_allclose(np.asarray(body.hidden[row]), full_hidden(source, body.feeds[row].ids)[-1],
                                       atol=1e-5)
        if source is gemma_tiny:  # SmolLM2 splits 'naïvely' and 東 into pieces gemma re-merges
            assert all(s["rollbacks"] > 0 for s in body.stats)


def test_batched_hybrid_equals_one_at_a_time(smol_tiny, gemma_tiny):
    rng = np.random.default_rng(1)
    pair = HybridPair(gemma_tiny, smol_tiny, AffineMap(
        W=rng.normal(size=(gemma_tiny.hidden_size, smol_tiny.hidden_size)).astype(np.float32),
        b=np.zeros(smol_tiny.hidden_size, np.float32)))
    batched = pair.generate_batch(PROMPTS, max_new_tokens=16, eos_ids=(), batch_size=3)
    assert sum(r.stats["rollbacks"] for r in batched) > 0
    for prompt, b in zip(PROMPTS, batched):
        a = pair.generate(prompt, max_new_tokens=16, eos_ids=())
        assert (b.token_ids, b.text) == (a.token_ids, a.text)
        assert b.stats["rollbacks"] == a.stats["rollbacks"]


def test_hybrid_with_identity_map_reproduces_the_native_model(smol_tiny):
    """Source = target and W = I: hybrid decoding and teacher-forced scores must equal native ones."""
    d = smol_tiny.hidden_size
    pair = HybridPair(smol_tiny, smol_tiny, AffineMap(W=np.eye(d, dtype=np.float32), b=np.zeros(d, np.float32)))
    prompt = "The quick brown fox"
    assert pair.generate(prompt, max_new_tokens=10, eos_ids=()).text == generate(
        smol_tiny, prompt, max_new_tokens=10, eos_ids=()).text
    scores = next_token_scores(pair, ["The quick brown fox jumps over the lazy dog and runs away.",
                                      "Linear maps, naïvely: cafés and  spaces\ttoo."], max_tokens=32)
    np.testing.assert_array_equal(scores["hybrid_argmax"], scores["native_argmax"])
    np.testing.assert_allclose(scores["hybrid_logprob"], scores["native_logprob"], atol=1e-4)
    metrics = summarize(scores)
    assert metrics["top1_agreement"] == 1.0
    assert metrics["perplexity_degradation_pct"] == pytest.approx(0.0, abs=1e-2)


def test_batched_scores_equal_what_hybrid_generation_computes(smol_tiny, gemma_tiny):
    """For each scored context, one hybrid decoding step from that context gives the same head distribution —
    including contexts that end inside a source token (run separately) and ones reused from the whole text."""
    rng = np.random.default_rng(0)
    pair = HybridPair(gemma_tiny, smol_tiny, AffineMap(
        W=rng.normal(size=(gemma_tiny.hidden_size, smol_tiny.hidden_size)).astype(np.float32),
        b=np.zeros(smol_tiny.hidden_size, np.float32)))
    scores = next_token_scores(pair, ["Tokenization boundaries differ: naïvely re-merged words."], max_tokens=24)
    assert scores["reused"].any() and not scores["reused"].all()
    for i in range(len(scores["token"])):
        step = pair.generate(scores["context"][i], max_new_tokens=1, eos_ids=(), record_logits=True)
        logp = jax.nn.log_softmax(step.logits[0])
        assert int(np.argmax(step.logits[0])) == scores["hybrid_argmax"][i]
        assert float(logp[scores["token"][i]]) == pytest.approx(scores["hybrid_logprob"][i], abs=1e-4)


def test_hybrid_never_emits_invalid_utf8(gemma_tiny, smol_tiny):
    """Bias the mapped state towards one SmolLM2 byte-level token: a stray continuation byte is masked out, and a
    lead byte ('Ġæ' = b' \\xe6') must be followed by exactly the continuation bytes that complete its character."""
    table = tokenizer_compat.token_byte_table(smol_tiny.tokenizer)
    head_row = jax.grad(lambda h, t: smol_tiny.lm_head(smol_tiny.params, h[None])[0, t])
    for favoured, expect_first in ((smol_tiny.tokenizer.token_to_id("Ŀ"), False),
                                   (smol_tiny.tokenizer.token_to_id("Ġæ"), True)):
        row = np.asarray(head_row(jnp.zeros(smol_tiny.hidden_size), favoured))
        bias = 50.0 * row / np.linalg.norm(row)
        pair = HybridPair(gemma_tiny, smol_tiny, AffineMap(
            W=np.zeros((gemma_tiny.hidden_size, smol_tiny.hidden_size), np.float32), b=bias.astype(np.float32)))
        result = pair.generate("Write:", max_new_tokens=12, eos_ids=())
        assert (result.token_ids[0] == favoured) == expect_first
        data = b"".join(table[t] for t in result.token_ids)
        text, consumed = codecs.utf_8_decode(data, "strict", False)  # raises on any invalid byte
        assert consumed == len(data) and "\ufffd" not in result.text and result.text == text


def test_token_map_between_a_model_and_itself_is_the_identity(smol_tiny):
    texts = [f"Sentence number {i} talks about {w} and more {w}s." for i, w in
             enumerate(["cats", "dogs", "naïve cafés", "Tokyo", "rivers", "maps", "tokens", "heads"] * 4)]
    # (no character split into byte-level pieces: those pieces share an end offset, so the paper's rule pairs them
    # all with the first piece, and a model's map onto itself would no longer be the identity)
    affine, meta = fit_token_map(smol_tiny, smol_tiny, texts, lam=1e-8, chunk_texts=10)
    n_real = sum(len(smol_tiny.tokenizer.encode(t, add_special_tokens=False).ids) for t in texts)
    assert meta["n_pairs"] == n_real and meta["lambda"] == 1e-8 and meta["source_fingerprint"] == smol_tiny.fingerprint
    # Pairs are exact (same tokenizer), so the map reproduces held-out states; an off-by-one pairing would not.
    states = full_hidden(smol_tiny, smol_tiny.tokenizer.encode("A held-out sentence about maps and 東京.").ids)
    mapped = np.asarray(affine(states))
    assert np.abs(mapped - states).max() <= 1e-3 * np.abs(states).max()


def test_both_directions_from_one_extraction_equal_separate_fits(smol_tiny, gemma_tiny):
    texts = ["Tokenizers disagree on naïvely re-merged words.", "A second, shorter text.", "Maps: one per direction!"]
    forward, backward = fit_token_maps(smol_tiny, gemma_tiny, texts, both_directions=True, chunk_texts=2)
    alone, meta = fit_token_map(gemma_tiny, smol_tiny, texts)
    assert backward[1]["n_pairs"] == meta["n_pairs"] != forward[1]["n_pairs"]
    assert (backward[1]["source_model"], backward[1]["target_model"]) == (gemma_tiny.spec, smol_tiny.spec)
    np.testing.assert_allclose(backward[0].W, alone.W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(backward[0].b, alone.b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_rejected(smol_tiny, gemma_tiny, tmp_path):
    d_s, d_t = smol_tiny.hidden_size, gemma_tiny.hidden_size
    good = AffineMap(W=np.zeros((d_s, d_t), np.float32), b=np.zeros(d_t, np.float32))
    pair = HybridPair(smol_tiny, gemma_tiny, good)
    with pytest.raises(LinalignError, match="non-empty string"):
        generate(smol_tiny, "", max_new_tokens=4)
    with pytest.raises(LinalignError, match="non-empty string"):
        pair.generate("", max_new_tokens=4)
    with pytest.raises(LinalignError, match="non-empty list"):
        generate_batch(smol_tiny, "Hi", max_new_tokens=4)
    with pytest.raises(LinalignError, match="batch_size"):
        pair.generate_batch(["Hi"], max_new_tokens=4, batch_size=0)
    with pytest.raises(LinalignError, match="stop strings"):
        generate_batch(smol_tiny, ["Hi"], max_new_tokens=4, stop_strings="x")
    for bad in (0, -3, True, 2.5):
        with pytest.raises(LinalignError, match="max_new_tokens"):
            pair.generate("Hi", max_new_tokens=bad)
    with pytest.raises(LinalignError, match="map is"):
        HybridPair(smol_tiny, gemma_tiny, AffineMap(W=np.zeros((d_s + 1, d_t), np.float32),
                                                    b=np.zeros(d_t, np.float32)))
    saved = save_map(tmp_path / "map", good, {"source_model": smol_tiny.spec, "target_model": gemma_tiny.spec,
                                              "source_fingerprint": smol_tiny.fingerprint,
                                              "target_fingerprint": gemma_tiny.fingerprint})
    assert load_pair_map(saved, smol_tiny, gemma_tiny)[0].source_dim == d_s
    other = dataclasses.replace(smol_tiny, spec="another-model", fingerprint="another-fingerprint")
    with pytest.raises(LinalignError, match="fitted with source model"):
        load_pair_map(saved, other, gemma_tiny)
    with pytest.raises(LinalignError, match="fitted with"):
        load_pair_map(saved, gemma_tiny, smol_tiny)  # the reverse direction
    with pytest.raises(LinalignError, match="no character offsets"):
        HybridPair(dataclasses.replace(smol_tiny, tokenizer=object()), gemma_tiny, good)
    with pytest.raises(LinalignError, match="explicit PRNG key"):
        generate(smol_tiny, "Hi", max_new_tokens=2, sampling=SamplingConfig(temperature=0.7))
    with pytest.raises(LinalignError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(LinalignError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(LinalignError, match="not a decoder"):
        generate(load_model(str(FIXTURES / "encoders" / sorted(p.name for p in (FIXTURES / "encoders").iterdir()
                                                                 if p.is_dir())[0])), "Hi", max_new_tokens=2)
    assert bucket(1, MIN_SEQUENCE) == 16 and bucket(17, MIN_SEQUENCE) == 32  # prompts share few executables
