"""Session table: capacity, expiry by TTL and idle time, and release exactly once, after the last user."""
import threading
import time

import pytest

from linalign_jax.serve.sessions import CapacityError, SessionError, SessionStore


def make_store(**kw):
    released = []
    store = SessionStore(released.append, **{"max_sessions": 2, "ttl_s": 60, "idle_s": 60, "reap_every_s": 0.05,
                                              **kw})
    return store, released


def test_capacity_and_close():
    store, released = make_store()
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


@pytest.mark.parametrize("kw, reason", [({"ttl_s": 0.2}, "TTL"), ({"idle_s": 0.2}, "idle")])
def test_sessions_expire(kw, reason):
    store, released = make_store(**kw)
    s = store.create("A", "query")
    time.sleep(0.6)
    assert released == ["A"]
    with pytest.raises(SessionError, match=reason):
        with store.use(s.id):
            pass
    store.close()


def test_state_released_only_after_last_user_returns():
    store, released = make_store(ttl_s=0.2)
    s = store.create("A", "fit")
    entered, finish = threading.Event(), threading.Event()

    def long_call():
        with store.use(s.id):
            entered.set()
            finish.wait(5)

    t = threading.Thread(target=long_call)
    t.start()
    entered.wait(5)
    time.sleep(0.5)  # TTL passes while the call runs: the session ends but its state stays in use
    assert s.ended.is_set() and released == []
    finish.set()
    t.join()
    assert released == ["A"]
    store.close()
