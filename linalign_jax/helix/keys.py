"""The one owner of OpenFHE's process-global rotation-key map.

OpenFHE keeps rotation keys in one process-global map keyed by the tag of the secret key that made them. A provider
serving many sessions therefore registers each session's keys under its tag (`_KeyRegistry`), restores the other
sessions' keys if a bundle tried to overwrite them, and removes only its own keys when a session closes.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Sequence

import openfhe as fhe

from linalign_jax.errors import LinalignError

class _SharedLock:
    """Many readers (evaluations) or one writer (a change of the global key map) at a time."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._readers == 0)
            yield


class _KeyRegistry:
    """Rotation keys of live sessions in OpenFHE's process-global map, one entry per secret-key tag.

    OpenFHE's Python bindings can only clear *all* automorphism keys and silently overwrite keys with the same tag on
    deserialization, so the registry remembers each tag's key map (the first one loaded wins), re-inserts them all after
    every change, and counts users per tag (a client and a provider may share one process, as in tests and benchmarks).
    Changes take the lock exclusively and evaluations share it, so no evaluation sees the map half restored.
    """

    def __init__(self):
        self.lock = _SharedLock()
        self._maps: dict[str, Any] = {}
        self._users: dict[str, int] = {}

    def add_serialized(self, cc: fhe.CryptoContext, key_tag: str, blob: bytes) -> None:
        with self.lock.exclusive():
            if blob:
                try:
                    fhe.DeserializeEvalAutomorphismKeyString(blob, fhe.BINARY)
                except RuntimeError as e:
                    self._restore(cc)
                    raise LinalignError(f"rotation keys: OpenFHE cannot deserialize them ({str(e)[-120:]})") from None
            tags = set(cc.GetAllEvalAutomorphismKeys())
            foreign = tags - set(self._maps) - {key_tag}
            if foreign:
                self._restore(cc)
                raise LinalignError(f"rotation keys carry foreign key tags {sorted(t[:12] for t in foreign)}; "
                                    f"expected only the session tag {key_tag[:12]}…")
            self._register(cc, key_tag, tags)

    def generate(self, cc: fhe.CryptoContext, secret_key: fhe.PrivateKey, rotations: Sequence[int]) -> None:
        """Generate rotation keys into the global map and register them (client side)."""
        with self.lock.exclusive():
            if rotations:
                cc.EvalRotateKeyGen(secret_key, list(rotations))
            self._register(cc, secret_key.GetKeyTag(), set(cc.GetAllEvalAutomorphismKeys()))

    def remove(self, cc: fhe.CryptoContext, key_tag: str) -> None:
        with self.lock.exclusive():
            if key_tag not in self._users:
                return
            self._users[key_tag] -= 1
            if not self._users[key_tag]:
                del self._users[key_tag], self._maps[key_tag]
                self._restore(cc)

    def _register(self, cc: fhe.CryptoContext, key_tag: str, tags: set[str]) -> None:
        if key_tag not in self._maps:
            self._maps[key_tag] = cc.GetEvalAutomorphismKeyMap(key_tag) if key_tag in tags else None
        self._users[key_tag] = self._users.get(key_tag, 0) + 1
        self._restore(cc)

    def _restore(self, cc: fhe.CryptoContext) -> None:
        cc.ClearEvalAutomorphismKeys()
        for tag, key_map in self._maps.items():
            if key_map is not None:
                cc.InsertEvalAutomorphismKey(key_map, tag)


KEYS = _KeyRegistry()
