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
from linalign_jax.serve.server import SERVICE, is_loopback


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
    """An authenticated channel to one provider. Without `tls_ca` it only talks to a loopback address unless
    `allow_plaintext` (the bearer token would otherwise cross the network in the clear)."""

    def __init__(self, target: str, *, token: str, tls_ca: str | None = None, tls_server_name: str | None = None,
                 allow_plaintext: bool = False, allow_insecure_preset_for_tests: bool = False,
                 max_message_bytes: int = 256 << 20, timeout_s: float = 120.0):
        host = target.rsplit(":", 1)[0]
        if not tls_ca and not allow_plaintext and not is_loopback(host):
            raise LinalignError(f"refusing to send the bearer token to {target} without TLS: give --tls_ca (the "
                                f"provider's certificate or CA), or --allow_plaintext on a trusted network")
        self.tls, self.allow_insecure_preset = bool(tls_ca), allow_insecure_preset_for_tests
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
        self._streams = {name: self._channel.stream_stream(method + name, _identity, _identity)
                         for name in ("Fit", "Bulk")}

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
        """The provider's public facts; refuses a provider that asks for a CKKS preset below 128-bit security (a
        malicious or misconfigured provider could otherwise make the client encrypt under a breakable ring)."""
        from linalign_jax.helix import PRESETS

        fields = self.call("Info", "info_request", expect="info").fields
        preset = fields.get("preset")
        if preset is not None and (preset not in PRESETS or not PRESETS[preset].secure) \
                and not self.allow_insecure_preset:
            raise RemoteError(None, f"provider at {self.target} asks for CKKS preset {preset!r}, which is not a "
                                    f"128-bit preset; refusing to encrypt under it (tests: "
                                    f"--allow_insecure_preset_for_tests)")
        return fields

    def open_session(self, fields: Mapping[str, Any], blobs: Sequence[bytes]) -> "RemoteSession":
        reply = self.call("OpenSession", "open_session", fields, blobs, expect="session_opened")
        return RemoteSession(self, reply.fields["session"], reply.bytes_up + reply.bytes_down)

    def _remote_error(self, error: grpc.RpcError, method: str) -> RemoteError:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return RemoteError(code, f"provider at {self.target} is unavailable during {method} (not running, "
                                     f"unreachable, or it went away mid-call): {details}{self._tls_hint(details)}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RemoteError(code, f"provider at {self.target} did not answer {method} in time: {details}")
        return RemoteError(code, f"provider rejected {method} ({code.name}): {details}")


    def _tls_hint(self, details: str) -> str:
        """What to change when the failure looks like a TLS mismatch (gRPC itself only says 'Socket closed')."""
        lowered = details.lower()
        if "hostname" in lowered or "peer name" in lowered or "subject" in lowered:
            return ("; hint: the provider's certificate does not name the address you dialled: pass "
                    "--tls_server_name=<a name in the certificate>, or make the certificate with "
                    "-addext 'subjectAltName=DNS:<host>,IP:127.0.0.1'")
        if not self.tls and "socket closed" in lowered:
            return "; hint: if the provider serves TLS, give --tls_ca=<its certificate>"
        if self.tls and ("handshake" in lowered or "ssl" in lowered or "certificate" in lowered):
            return ("; hint: TLS handshake failed: is --tls_ca the provider's certificate, and does the provider "
                    "serve TLS at all?")
        return ""


class RemoteSession:
    """A provider session. A background lease stream lets the provider notice at once if this process vanishes."""

    def __init__(self, client: ProviderClient, session_id: str, setup_bytes: int):
        self.client, self.id, self.setup_bytes = client, session_id, setup_bytes
        self._lease_call = client._lease(wire.encode("lease", {"session": session_id}),
                                         metadata=client._metadata)
        self._closing = False
        self._leased = threading.Event()
        self._lease_thread = threading.Thread(target=self._hold_lease, name="helix-lease", daemon=True)
        self._lease_thread.start()
        # The provider answers a lease with a heartbeat at once: from here on, if this process dies, the provider
        # notices and frees the session (without the wait, a client killed right after opening leaves it to expire).
        self._leased.wait(timeout=10.0)

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def query(self, fields: Mapping[str, Any], blobs: Sequence[bytes], timeout_s: float | None = None) -> Reply:
        return self.client.call("Query", "query", {"session": self.id, **fields}, blobs, expect="query_result",
                                timeout_s=timeout_s)

    def fit(self, start: Mapping[str, Any], batches: Iterable[tuple[Mapping[str, Any], Sequence[bytes]]],
            timeout_s: float) -> Iterator[Reply]:
        """Stream `fit_batch` messages, then yield the provider's `fit_result` messages."""
        return self.stream("Fit", "fit", start, batches, timeout_s)

    def bulk(self, start: Mapping[str, Any], batches: Iterable[tuple[Mapping[str, Any], Sequence[bytes]]],
             timeout_s: float) -> Iterator[Reply]:
        """Stream `bulk_batch` messages of feature ciphertexts, then yield the `bulk_result` messages."""
        return self.stream("Bulk", "bulk", start, batches, timeout_s)

    def stream(self, method: str, name: str, start: Mapping[str, Any],
               batches: Iterable[tuple[Mapping[str, Any], Sequence[bytes]]], timeout_s: float) -> Iterator[Reply]:
        """`<name>_start`, the batches, `<name>_end` out; the `<name>_result` replies in. Bytes are counted per reply
        (`bytes_up` of the first reply also carries everything sent before it)."""
        sent, failure = [0], []

        def requests() -> Iterator[bytes]:
            # Lazy: each batch is encrypted only when gRPC is ready to send it, so the client's encryption overlaps
            # the provider's evaluation and at most a few batches are in memory.
            messages = itertools.chain([(f"{name}_start", {"session": self.id, **start}, ())],
                                       ((f"{name}_batch", f, b) for f, b in batches), [(f"{name}_end", {}, ())])
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
            for raw in self.client._streams[method](requests(), timeout=timeout_s, metadata=self.client._metadata):
                frame = wire.decode(raw, f"{name}_result")
                up, sent[0] = sent[0], 0
                yield Reply(frame.header, frame.blobs, up, len(raw), time.perf_counter() - start_time)
        except grpc.RpcError as e:
            if failure:
                raise failure[0] from None
            raise self.client._remote_error(e, method) from None

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
                self._leased.set()
        except grpc.RpcError:
            pass
        finally:
            self._leased.set()


def _identity(data: bytes) -> bytes:
    return data
