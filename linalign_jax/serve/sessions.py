"""Provider-side session table: key material a client uploaded once, with a lifetime, an idle limit, size caps and an
optional query quota.

A session holds whatever the protocol layer built from the client's key bundle (deserialized context, public and
rotation keys, an evaluation plan). It ends when the client closes it, when its TTL or idle limit passes (a reaper
thread checks every second; tests call `reap()` with an injected clock instead), or when the client's lease stream
breaks (the client process died or lost the network). Ending is two-phase: the session leaves the table at once, so
new calls fail with a clear "ended" error, and its key material is released when the last call still using it returns.

Limits: `max_sessions` in all, `max_per_client` per client address (one client cannot take every slot), and
`max_queries` per session (0 = none): full logits let a client extract a d-dimensional head with about d queries, so
a provider that cares can cap how many a session gets.
"""
from __future__ import annotations

import collections
import contextlib
import secrets
import sys
import threading
import time
from typing import Any, Callable, Iterator

from linalign_jax.errors import LinalignError

# How many ended session ids are remembered, so that a late call hears "expired" rather than "unknown".
_ENDED_MEMORY = 4096


class SessionError(LinalignError):
    """The named session does not exist (any more); the message says which and why."""


class CapacityError(LinalignError):
    """A limit is reached: sessions in all or per client, or a session's query quota."""


class Session:
    def __init__(self, session_id: str, state: Any, purpose: str, client: str, now: float, ttl_s: float,
                 idle_s: float):
        self.id, self.state, self.purpose, self.client = session_id, state, purpose, client
        self.created, self.last_used = now, now
        self.deadline = now + ttl_s
        self.idle_s = idle_s
        self.users = 0
        self.queries = 0
        self.leased = False  # one lease stream per session: each parks a provider thread
        self.ended = threading.Event()
        self.end_reason = ""

    def expiry(self, now: float) -> str | None:
        if now >= self.deadline:
            return "expired (session TTL reached)"
        if self.users == 0 and now - self.last_used >= self.idle_s:
            return f"expired (idle for more than {self.idle_s:g} s)"  # a long call is held to its TTL only
        return None


class SessionStore:
    """Thread-safe table of live sessions. `release(state)` frees a session's key material exactly once."""

    def __init__(self, release: Callable[[Any], None], *, max_sessions: int, ttl_s: float, idle_s: float,
                 max_per_client: int | None = None, max_queries: int = 0, reap_every_s: float | None = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        max_per_client = max_sessions if max_per_client is None else max_per_client
        if min(max_sessions, max_per_client) < 1 or ttl_s <= 0 or idle_s <= 0 or max_queries < 0:
            raise LinalignError(f"sessions need max_sessions >= 1, max_per_client >= 1, ttl_s > 0, idle_s > 0 and "
                                f"max_queries >= 0, got {max_sessions}, {max_per_client}, {ttl_s}, {idle_s}, "
                                f"{max_queries}")
        self._release, self._clock = release, clock
        self.max_sessions, self.max_per_client, self.max_queries = max_sessions, max_per_client, max_queries
        self.ttl_s, self.idle_s = ttl_s, idle_s
        self._live: dict[str, Session] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if reap_every_s is not None:
            threading.Thread(target=self._reap_loop, args=(reap_every_s,), name="helix-session-reaper",
                             daemon=True).start()

    def create(self, state: Any, purpose: str, client: str = "") -> Session:
        """Register `state`; on a full table (in all or for this client) the state is released and CapacityError
        raised."""
        with self._lock:
            mine = sum(s.client == client for s in self._live.values())
            if len(self._live) >= self.max_sessions:
                refusal = (f"the provider already holds its maximum of {self.max_sessions} sessions; close one or "
                           f"retry later")
            elif mine >= self.max_per_client:
                refusal = (f"client {client or '?'} already holds its maximum of {self.max_per_client} sessions; "
                           f"close one first")
            else:
                refusal = None
                session = Session(secrets.token_hex(16), state, purpose, client, self._clock(), self.ttl_s,
                                  self.idle_s)
                self._live[session.id] = session
        if refusal:
            self._release(state)
            raise CapacityError(refusal)
        return session

    @contextlib.contextmanager
    def use(self, session_id: str, queries: int = 0) -> Iterator[Session]:
        """Borrow a live session for one call that spends `queries` of its quota; its idle clock restarts."""
        with self._lock:
            session = self._live.get(session_id)
            if session is None:
                reason = self._ended.get(session_id)
                if reason is None:
                    raise SessionError(f"unknown session {session_id[:8]!r}…; open a session first")
                raise SessionError(f"session {session_id[:8]!r}… has ended: {reason}; open a new session")
            if self.max_queries and session.queries + queries > self.max_queries:
                raise CapacityError(f"session {session_id[:8]}… has used {session.queries} of its quota of "
                                    f"{self.max_queries} queries; this call asks for {queries} more")
            session.queries += queries
            session.users += 1
            session.last_used = self._clock()
        try:
            yield session
        finally:
            with self._lock:
                session.users -= 1
                session.last_used = self._clock()
                free = session.ended.is_set() and session.users == 0
            if free:
                self._free(session)

    def end(self, session_id: str, reason: str) -> bool:
        """End a session (idempotent). Returns False when it was not live."""
        with self._lock:
            session = self._live.pop(session_id, None)
            if session is None:
                return False
            session.end_reason = reason
            self._ended[session_id] = reason
            while len(self._ended) > _ENDED_MEMORY:
                self._ended.popitem(last=False)
            session.ended.set()
            free = session.users == 0
        if free:
            self._free(session)
        return True

    def live_count(self) -> int:
        with self._lock:
            return len(self._live)

    def reap(self) -> list[str]:
        """End every session whose TTL or idle limit has passed at the clock's current time; returns their ids."""
        now = self._clock()
        with self._lock:
            due = [(s.id, reason) for s in self._live.values() if (reason := s.expiry(now))]
        for session_id, reason in due:
            self.end(session_id, reason)
        return [session_id for session_id, _ in due]

    def close(self) -> None:
        """Stop the reaper and end every session (provider shutdown)."""
        self._stop.set()
        with self._lock:
            live = list(self._live)
        for session_id in live:
            self.end(session_id, "provider shut down")

    def _free(self, session: Session) -> None:
        state, session.state = session.state, None
        if state is not None:
            self._release(state)
            print(f"helix provider: session {session.id[:8]}… freed ({session.end_reason})", file=sys.stderr,
                  flush=True)

    def _reap_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.reap()
