"""Client transport for a HELIX provider: authenticated channel, sessions held by a lease stream, byte accounting.

Every failure surfaces as `RemoteError` (a LinalignError) carrying the gRPC status code and the provider's one-line
message, so binaries can print it and exit non-zero.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import grpc

from linalign_jax.errors import LinalignError
from linalign_jax.serve import auth, wire
from linalign_jax.serve.server import SERVICE


class RemoteError(LinalignError):
    def __init__(self, code: grpc.StatusCode | None, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Reply:
    fields: dict[str, Any]
    blobs: tuple[bytes, ...]
    bytes_up: int
    bytes_down: int
    seconds: float


class ProviderClient:
    def __init__(self, target: str, *, token: str, tls_ca: str | None = None, tls_server_name: str | None = None,
                 max_message_bytes: int = 256 << 20, timeout_s: float = 120.0):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        self.target, self.timeout_s = target, timeout_s
        self._metadata = auth.call_metadata(token)
        self._channel = (grpc.secure_channel(target, auth.channel_credentials(tls_ca), options=options) if tls_ca
                         else grpc.insecure_channel(target, options=options))
        method = f"/{SERVICE}/"
        self._unary = {name: self._channel.unary_unary(method + name, _identity, _identity)
                       for name in ("Info", "OpenSession", "Query", "CloseSession")}
        self._lease = self._channel.unary_stream(method + "Lease", _identity, _identity)
        self._fit = self._channel.stream_stream(method + "Fit", _identity, _identity)

    def __enter__(self) -> "ProviderClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, kind: str, fields: Mapping[str, Any] | None = None, blobs: Sequence[bytes] = (),
             *, expect: str, timeout_s: float | None = None) -> Reply:
        request = wire.encode(kind, fields, blobs)
        start = time.perf_counter()
        try:
            raw = self.call_raw(method, request, timeout_s)
        except grpc.RpcError as e:
            raise self._remote_error(e, method) from None
        frame = wire.decode(raw, expect)
        return Reply(frame.header, frame.blobs, len(request), len(raw), time.perf_counter() - start)

    def call_raw(self, method: str, request: bytes, timeout_s: float | None = None) -> bytes:
        """Send pre-encoded bytes to a unary method (grpc.RpcError passes through): for probing the provider."""
        return self._unary[method](request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def info(self) -> dict[str, Any]:
        return self.call("Info", "info_request", expect="info").fields

    def open_session(self, fields: Mapping[str, Any], blobs: Sequence[bytes]) -> "RemoteSession":
        reply = self.call("OpenSession", "open_session", fields, blobs, expect="session_opened")
        return RemoteSession(self, reply.fields["session"], reply.bytes_up + reply.bytes_down)

    def _remote_error(self, error: grpc.RpcError, method: str) -> RemoteError:
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            return RemoteError(code, f"provider at {self.target} is unavailable during {method} (not running, "
                                     f"unreachable, or it went away mid-call): {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RemoteError(code, f"provider at {self.target} did not answer {method} in time: {details}")
        return RemoteError(code, f"provider rejected {method} ({code.name}): {details}")


class RemoteSession:
    """A provider session. A background lease stream lets the provider notice at once if this process vanishes."""

    def __init__(self, client: ProviderClient, session_id: str, setup_bytes: int):
        self.client, self.id, self.setup_bytes = client, session_id, setup_bytes
        self._lease_call = client._lease(wire.encode("lease", {"session": session_id}),
                                         metadata=client._metadata)
        self._closing = False
        self._lease_thread = threading.Thread(target=self._hold_lease, name="helix-lease", daemon=True)
        self._lease_thread.start()

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def query(self, fields: Mapping[str, Any], blobs: Sequence[bytes], timeout_s: float | None = None) -> Reply:
        return self.client.call("Query", "query", {"session": self.id, **fields}, blobs, expect="query_result",
                                timeout_s=timeout_s)

    def fit(self, start: Mapping[str, Any], batches: Iterable[tuple[Mapping[str, Any], Sequence[bytes]]],
            timeout_s: float) -> Iterator[Reply]:
        """Stream `fit_batch` messages, then yield the provider's `fit_result` messages; bytes are counted per reply
        (`bytes_up` of the first reply also carries everything sent)."""
        sent, failure = [0], []

        def requests() -> Iterator[bytes]:
            # Lazy: each batch is encrypted only when gRPC is ready to send it, so the client's encryption overlaps
            # the provider's evaluation and at most a few batches are in memory.
            messages = itertools.chain([("fit_start", {"session": self.id, **start}, ())],
                                       (("fit_batch", f, b) for f, b in batches), [("fit_end", {}, ())])
            try:
                for kind, fields, blobs in messages:
                    raw = wire.encode(kind, fields, blobs)
                    sent[0] += len(raw)
                    yield raw
            except Exception as e:  # gRPC would only report "Exception iterating requests!"
                failure.append(e)
                raise

        start_time = time.perf_counter()
        try:
            for raw in self.client._fit(requests(), timeout=timeout_s, metadata=self.client._metadata):
                frame = wire.decode(raw, "fit_result")
                up, sent[0] = sent[0], 0
                yield Reply(frame.header, frame.blobs, up, len(raw), time.perf_counter() - start_time)
        except grpc.RpcError as e:
            if failure:
                raise failure[0] from None
            raise self.client._remote_error(e, "Fit") from None

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self.client.call("CloseSession", "close_session", {"session": self.id}, expect="session_closed",
                             timeout_s=10.0)
        except RemoteError:
            pass  # the provider is gone or already ended the session: nothing left to free on our side
        finally:
            self._lease_call.cancel()
            self._lease_thread.join(timeout=5.0)

    def _hold_lease(self) -> None:
        """Drain heartbeats until we cancel or the provider ends the session; calls then report why themselves."""
        try:
            for _ in self._lease_call:
                pass
        except grpc.RpcError:
            pass


def _identity(data: bytes) -> bytes:
    return data
