import numpy as np
import pytest

from linalign_jax.align.pairing import gather_pairs, pair_token_offsets, pair_tokens
from linalign_jax.errors import LinalignError


def _brute(target_ends, source_ends, source_real):
    out = []
    for e in target_ends:
        cands = [k for k, (s, r) in enumerate(zip(source_ends, source_real)) if r and s >= e]
        out.append(min(cands) if cands else -1)
    return np.array(out)


def test_paper_rule_on_two_tokenizations():
    # "unbelievable day": target tokens "un|believ|able| day" vs source "unbeliev|able| d|ay"
    target_ends = np.array([2, 8, 12, 16])
    source_ends = np.array([8, 12, 14, 16])
    np.testing.assert_array_equal(pair_tokens(target_ends, source_ends), [0, 0, 1, 3])
    # A target token ending after the source text ends has no partner.
    np.testing.assert_array_equal(pair_tokens(np.array([5, 20]), np.array([4, 10])), [1, -1])


def test_batched_with_masks_matches_brute_force():
    rng = np.random.default_rng(0)
    B, T, S = 6, 9, 7
    t_ends = np.sort(rng.integers(0, 40, size=(B, T)), axis=1)
    s_ends = np.sort(rng.integers(0, 40, size=(B, S)), axis=1)
    t_mask = (rng.random((B, T)) > 0.2).astype(np.int32)
    s_mask = (rng.random((B, S)) > 0.3).astype(np.int32)
    got = np.asarray(pair_token_offsets(t_ends, s_ends, t_mask, s_mask))
    for b in range(B):
        want = _brute(t_ends[b], s_ends[b], s_mask[b].astype(bool))
        want[t_mask[b] == 0] = -1
        np.testing.assert_array_equal(got[b], want)


def test_gather_pairs():
    pairs = np.array([[1, -1, 0]])
    tgt = np.arange(3 * 2).reshape(1, 3, 2).astype(float)
    src = 10 + np.arange(2 * 4).reshape(1, 2, 4).astype(float)
    s, t = gather_pairs(tgt, src, pairs)
    np.testing.assert_array_equal(t, tgt[0, [0, 2]])
    np.testing.assert_array_equal(s, src[0, [1, 0]])


def test_bad_offsets():
    with pytest.raises(LinalignError, match="non-decreasing"):
        pair_tokens(np.array([1, 2]), np.array([5, 3]))
    with pytest.raises(LinalignError, match="1-D"):
        pair_tokens(np.zeros((2, 2)), np.array([1]))
    np.testing.assert_array_equal(pair_tokens(np.array([1, 2]), np.array([], int)), [-1, -1])
