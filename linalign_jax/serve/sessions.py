"""Provider-side session table: key material a client uploaded once, with a lifetime, an idle limit and a size cap.

A session holds whatever the protocol layer built from the client's key bundle (deserialized context, public and
rotation keys, an evaluation plan). It ends when the client closes it, when its TTL or idle limit passes (a reaper
thread checks every second), or when the client's lease stream breaks (the client process died or lost the network).
Ending is two-phase: the session leaves the table at once, so new calls fail with a clear "ended" error, and its key
material is released when the last call still using it returns.
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
    """The provider already holds its maximum number of sessions."""


class Session:
    def __init__(self, session_id: str, state: Any, purpose: str, ttl_s: float, idle_s: float):
        now = time.monotonic()
        self.id, self.state, self.purpose = session_id, state, purpose
        self.created, self.last_used = now, now
        self.deadline = now + ttl_s
        self.idle_s = idle_s
        self.users = 0
        self.leased = False  # one lease stream per session: each parks a provider thread
        self.ended = threading.Event()
        self.end_reason = ""

    def expiry(self, now: float) -> str | None:
        if now >= self.deadline:
            return "expired (session TTL reached)"
        if now - self.last_used >= self.idle_s:
            return f"expired (idle for more than {self.idle_s:g} s)"
        return None


class SessionStore:
    """Thread-safe table of live sessions. `release(state)` frees a session's key material exactly once."""

    def __init__(self, release: Callable[[Any], None], *, max_sessions: int, ttl_s: float, idle_s: float,
                 reap_every_s: float = 1.0):
        if max_sessions < 1 or ttl_s <= 0 or idle_s <= 0:
            raise LinalignError(f"sessions need max_sessions >= 1, ttl_s > 0 and idle_s > 0, got {max_sessions}, "
                                f"{ttl_s}, {idle_s}")
        self._release = release
        self.max_sessions, self.ttl_s, self.idle_s = max_sessions, ttl_s, idle_s
        self._live: dict[str, Session] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, args=(reap_every_s,), name="helix-session-reaper",
                                        daemon=True)
        self._reaper.start()

    def create(self, state: Any, purpose: str) -> Session:
        """Register `state`; on a full table the state is released and CapacityError raised."""
        with self._lock:
            full = len(self._live) >= self.max_sessions
            if not full:
                session = Session(secrets.token_hex(16), state, purpose, self.ttl_s, self.idle_s)
                self._live[session.id] = session
        if full:
            self._release(state)
            raise CapacityError(f"the provider already holds its maximum of {self.max_sessions} sessions; "
                                f"close one or retry later")
        return session

    @contextlib.contextmanager
    def use(self, session_id: str) -> Iterator[Session]:
        """Borrow a live session for one call; its idle clock restarts."""
        with self._lock:
            session = self._live.get(session_id)
            if session is None:
                reason = self._ended.get(session_id)
                if reason is None:
                    raise SessionError(f"unknown session {session_id[:8]!r}…; open a session first")
                raise SessionError(f"session {session_id[:8]!r}… has ended: {reason}; open a new session")
            session.users += 1
            session.last_used = time.monotonic()
        try:
            yield session
        finally:
            with self._lock:
                session.users -= 1
                session.last_used = time.monotonic()
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

    def close(self) -> None:
        """Stop the reaper and end every session (provider shutdown)."""
        self._stop.set()
        for session_id in list(self._live):
            self.end(session_id, "provider shut down")

    def _free(self, session: Session) -> None:
        state, session.state = session.state, None
        if state is not None:
            self._release(state)
            print(f"helix provider: session {session.id[:8]}… freed ({session.end_reason})", file=sys.stderr,
                  flush=True)

    def _reap(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            now = time.monotonic()
            with self._lock:
                due = [(s.id, r) for s in self._live.values() if s.users == 0 and (r := s.expiry(now))]
                # A session inside a long call is only held to its TTL, not to the idle limit.
                due += [(s.id, "expired (session TTL reached)") for s in self._live.values()
                        if s.users > 0 and now >= s.deadline]
            for session_id, reason in due:
                self.end(session_id, reason)
