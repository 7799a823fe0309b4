"""The one owner of OpenFHE's process-global rotation-key map.

OpenFHE keeps rotation keys in one process-global map keyed by the tag of the secret key that made them; evaluations
read it, and inserting or clearing entries while another thread reads it is a data race in C++. So:
- every change goes through `KEYS` and takes `KEYS.lock` exclusively; every evaluation that rotates holds it shared;
- the lock is writer-preferring: once a writer waits, new readers queue behind it, so a stream of evaluations cannot
  starve a session that opens or closes (and readers never nest, so this cannot deadlock);
- untrusted bytes are never parsed under the lock: a client's rotation keys arrive as one serialized `EvalKeyMap`
  (`serialize_rotation_keys`), which `add_serialized` deserializes into a private object first (no global state) and
  then only *inserts* under the lock — a pointer swap, however large the keys;
- a bundle that fails registers nothing: `add_serialized` is the last step of loading a session (after the template
  check, the sandbox and the public key), and it either registers the whole map or raises before touching the
  global one;
- OpenFHE's bindings can only clear *all* automorphism keys, so the registry remembers each tag's map (the first one
  loaded wins: a client and a provider may share one process, as in tests and benchmarks), counts users per tag, and
  re-inserts them all after every removal;
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Sequence

import openfhe as fhe

from linalign_jax.errors import LinalignError


class WriterPreferringLock:
    """Many readers (evaluations) or one writer (a change of the global key map); waiting writers go first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._writing and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def serialize_rotation_keys(cc: fhe.CryptoContext, key_tag: str) -> bytes:
    """A session's rotation keys as one `EvalKeyMap` (b"" without any): the form `add_serialized` parses without
    touching the global map."""
    if key_tag not in set(cc.GetAllEvalAutomorphismKeys()):
        return b""
    return fhe.Serialize(cc.GetEvalAutomorphismKeyMap(key_tag), fhe.BINARY)


def parse_rotation_keys(blob: bytes) -> Any:
    """`serialize_rotation_keys` bytes as a private EvalKeyMap (check them with validate.py first)."""
    from linalign_jax.helix.validate import openfhe_parse

    return openfhe_parse(fhe.DeserializeEvalKeyMapString, blob, "rotation keys")


class _KeyRegistry:
    """Rotation keys of live sessions in OpenFHE's process-global map, one entry per secret-key tag."""

    def __init__(self):
        self.lock = WriterPreferringLock()
        self._maps: dict[str, Any] = {}
        self._users: dict[str, int] = {}

    def add_serialized(self, cc: fhe.CryptoContext, key_tag: str, blob: bytes) -> None:
        """Register a session's rotation keys from `serialize_rotation_keys` bytes (checked by validate.py first):
        parsed outside the lock, inserted under it."""
        key_map = parse_rotation_keys(blob) if blob else None
        with self.lock.exclusive():
            self._register(cc, key_tag, key_map)

    def generate(self, cc: fhe.CryptoContext, secret_key: fhe.PrivateKey, rotations: Sequence[int]) -> None:
        """Generate rotation keys into the global map and register them (client side)."""
        key_tag = secret_key.GetKeyTag()
        with self.lock.exclusive():
            if rotations:
                cc.EvalRotateKeyGen(secret_key, list(rotations))
            key_map = cc.GetEvalAutomorphismKeyMap(key_tag) if rotations else None
            self._register(cc, key_tag, key_map)

    def remove(self, cc: fhe.CryptoContext, key_tag: str) -> None:
        with self.lock.exclusive():
            if key_tag not in self._users:
                return
            self._users[key_tag] -= 1
            if not self._users[key_tag]:
                del self._users[key_tag], self._maps[key_tag]
                self._restore(cc)

    def registered(self) -> int:
        """How many key tags hold registered rotation keys (tests check that failed bundles add none)."""
        with self.lock.shared():
            return sum(m is not None for m in self._maps.values())

    def _register(self, cc: fhe.CryptoContext, key_tag: str, key_map: Any) -> None:
        if key_tag not in self._maps:
            self._maps[key_tag] = key_map
            if key_map is not None:
                cc.InsertEvalAutomorphismKey(key_map, key_tag)
        self._users[key_tag] = self._users.get(key_tag, 0) + 1

    def _restore(self, cc: fhe.CryptoContext) -> None:
        cc.ClearEvalAutomorphismKeys()
        for tag, key_map in self._maps.items():
            if key_map is not None:
                cc.InsertEvalAutomorphismKey(key_map, tag)


KEYS = _KeyRegistry()
