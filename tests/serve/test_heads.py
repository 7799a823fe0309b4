"""The fitted-head store is bounded: at most max_heads variants, each deleted (from disk too) after its TTL, and
only a few held in memory."""
import numpy as np
import pytest

pytest.importorskip("openfhe")  # ServedHead lives in the HELIX protocol module

from linalign_jax.helix.protocol import ServedHead  # noqa: E402
from linalign_jax.serve.heads import HeadStore  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 1e9

    def __call__(self):
        return self.now


def head(i):
    return ServedHead(np.full((3, 2), float(i)), np.zeros(2), ("a", "b"))


def test_store_is_bounded_by_count_and_ttl(tmp_path):
    clock = Clock()
    store = HeadStore(tmp_path, max_heads=2, ttl_s=100, cache=1, clock=clock)
    store["fit-a"] = head(1)
    clock.now += 10
    store["fit-b"] = head(2)
    clock.now += 10
    store["fit-c"] = head(3)  # the oldest (fit-a) makes room
    assert len(store) == 2 and not (tmp_path / "fit-a").exists()
    with pytest.raises(KeyError):
        store["fit-a"]
    assert store["fit-b"].V[0, 0] == 2  # read back from disk: the memory cache holds one
    clock.now += 95  # fit-b is 105 s old, fit-c 95 s
    with pytest.raises(KeyError):
        store["fit-b"]
    assert not (tmp_path / "fit-b").exists() and store["fit-c"].V[0, 0] == 3
    restarted = HeadStore(tmp_path, max_heads=2, ttl_s=1e9)  # a restarted provider finds the survivor on disk
    assert restarted["fit-c"].V[0, 0] == 3 and len(restarted) == 1


def test_memory_only_store_keeps_max_heads():
    store = HeadStore(None, max_heads=3)
    for i in range(5):
        store[f"fit-{i}"] = head(i)
    assert len(store) == 3 and store["fit-4"].V[0, 0] == 4
    with pytest.raises(KeyError):
        store["fit-0"]
