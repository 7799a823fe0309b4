"""Session table: capacity (in all and per client), expiry by TTL and idle time on an injected clock, query quotas,
and release exactly once, after the last user."""
import threading

import pytest

from linalign_jax.serve.sessions import CapacityError, SessionError, SessionStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_store(**kw):
    released, clock = [], Clock()
    store = SessionStore(released.append, **{"max_sessions": 2, "ttl_s": 60, "idle_s": 30, "reap_every_s": None,
                                              "clock": clock, **kw})
    return store, released, clock


def test_capacity_and_close():
    store, released, _ = make_store()
    a = store.create("A", "query")
    store.create("B", "query")
    with pytest.raises(CapacityError, match="maximum of 2 sessions"):
        store.create("C", "query")
    assert released == ["C"]  # the refused state is freed at once
    assert store.end(a.id, "closed by the client") and not store.end(a.id, "again")
    assert released == ["C", "A"]
    with pytest.raises(SessionError, match="has ended: closed by the client"):
        with store.use(a.id):
            pass
    with pytest.raises(SessionError, match="unknown session"):
        with store.use("nope"):
            pass
    store.close()
    assert sorted(released) == ["A", "B", "C"]


def test_per_client_limit():
    store, released, _ = make_store(max_sessions=4, max_per_client=1)
    store.create("A", "query", client="ipv4:10.0.0.1")
    with pytest.raises(CapacityError, match="client ipv4:10.0.0.1 already holds its maximum of 1 sessions"):
        store.create("B", "query", client="ipv4:10.0.0.1")
    store.create("C", "query", client="ipv4:10.0.0.2")  # another client still gets one
    assert released == ["B"]
    store.close()


@pytest.mark.parametrize("advance, reason", [(61, "TTL"), (31, "idle for more than 30 s")])
def test_sessions_expire_on_the_injected_clock(advance, reason):
    store, released, clock = make_store()
    s = store.create("A", "query")
    clock.now += advance - 2
    if advance > 60:  # stay active so only the TTL can end it
        with store.use(s.id):
            pass
    assert store.reap() == [] and released == []
    clock.now += 2
    assert store.reap() == [s.id] and released == ["A"]
    with pytest.raises(SessionError, match=reason):
        with store.use(s.id):
            pass


def test_a_call_in_progress_is_held_to_the_ttl_only():
    store, released, clock = make_store()
    s = store.create("A", "fit")
    with store.use(s.id):
        clock.now += 45  # past the idle limit, inside a call
        assert store.reap() == []
        clock.now += 20  # past the TTL: the session ends, but its state stays in use until the call returns
        assert store.reap() == [s.id] and s.ended.is_set() and released == []
    assert released == ["A"]


def test_query_quota():
    store, _, _ = make_store(max_queries=3)
    s = store.create("A", "query")
    with store.use(s.id, queries=2):
        pass
    with pytest.raises(CapacityError, match="used 2 of its quota of 3 queries; this call asks for 2 more"):
        with store.use(s.id, queries=2):
            pass
    with store.use(s.id, queries=1):
        pass
    store.close()


def test_state_released_only_after_last_user_returns_across_threads():
    store, released, _ = make_store()
    s = store.create("A", "fit")
    entered, finish = threading.Event(), threading.Event()

    def long_call():
        with store.use(s.id):
            entered.set()
            finish.wait(5)

    t = threading.Thread(target=long_call)
    t.start()
    entered.wait(5)
    store.end(s.id, "closed by the client")
    assert s.ended.is_set() and released == []
    finish.set()
    t.join()
    assert released == ["A"]
