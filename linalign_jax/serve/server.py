"""The HELIX provider as a gRPC service over raw bytes (generic handlers, `wire` frames; no protobuf codegen).

Methods of `linalign.helix.v1.Provider`:

    Info          unary   -> public facts the client needs for keygen (shapes, ring preset, public set, limits)
    OpenSession   unary   -> the client uploads its key bundle once; returns a session id
    Lease         stream  <- heartbeats for as long as the session lives; when this stream breaks (the client died or
                             lost the network) the provider ends the session and frees its keys at once
    Query         unary   -> ciphertext(s) in, encrypted logits out
    Fit           bidi    -> the secure map fit: encrypted public-set columns in, Enc(Z_Aᵀ Z_B) out (paper §3.2)
    CloseSession  unary

Everything cryptographic lives behind `core` (`linalign_jax.helix.protocol.ProviderCore`); this module does transport:
bearer-token auth, optional TLS, message-size limits, the session table, error mapping and concurrency. Errors reach
the client as gRPC status codes with one-line messages; the provider never logs request payloads (it only ever holds
ciphertexts, and logs session lifecycle events only).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import sys
import traceback
from typing import Any, Callable, Iterator

import grpc

from linalign_jax.errors import LinalignError
from linalign_jax.serve import auth, wire
from linalign_jax.serve.sessions import CapacityError, SessionError, SessionStore

SERVICE = "linalign.helix.v1.Provider"
HEARTBEAT_S = 2.0


def _identity(data: bytes) -> bytes:
    return data


class ProviderServer:
    """A running provider: `start()` binds and serves, `stop()` ends every session and shuts the server down."""

    def __init__(self, core: Any, *, token: str, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[str, str] | None = None, max_sessions: int = 64, session_ttl_s: float = 3600.0,
                 idle_timeout_s: float = 300.0, max_message_bytes: int = 256 << 20, workers: int = 8):
        self.core, self._token = core, token
        self.sessions = SessionStore(core.release, max_sessions=max_sessions, ttl_s=session_ttl_s,
                                     idle_s=idle_timeout_s)
        self.max_message_bytes = max_message_bytes
        # Each live lease parks one thread, so the pool has room for every session plus the working threads.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_sessions + workers,
                                                           thread_name_prefix="helix-rpc")
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.server(self._pool, options=options)
        self._server.add_generic_rpc_handlers((self._handlers(),))
        address = f"{host}:{port}"
        creds = auth.server_credentials(*tls) if tls else None
        self.port = (self._server.add_secure_port(address, creds) if creds
                     else self._server.add_insecure_port(address))
        if self.port == 0:
            raise LinalignError(f"cannot bind the provider to {address} (port in use or address not local?)")
        self.host = host

    def start(self) -> "ProviderServer":
        self._server.start()
        return self

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace_s: float = 2.0) -> None:
        self.sessions.close()
        self._server.stop(grace_s).wait()
        self._pool.shutdown(wait=False)

    # ---- handlers -------------------------------------------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        unary = functools.partial(grpc.unary_unary_rpc_method_handler, request_deserializer=_identity,
                                  response_serializer=_identity)
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Info": unary(self._guard(self._info)),
            "OpenSession": unary(self._guard(self._open_session)),
            "Query": unary(self._guard(self._query)),
            "CloseSession": unary(self._guard(self._close_session)),
            "Lease": grpc.unary_stream_rpc_method_handler(self._guard_stream(self._lease), _identity, _identity),
            "Fit": grpc.stream_stream_rpc_method_handler(self._guard_stream(self._fit), _identity, _identity),
        })

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if not auth.is_authorized(context.invocation_metadata(), self._token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

    def _guard(self, method: Callable[[bytes, grpc.ServicerContext], bytes]):
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._authorize(context)
            with _status_on_error(context):
                return method(request, context)
        return call

    def _guard_stream(self, method: Callable[[Any, grpc.ServicerContext], Iterator[bytes]]):
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
            self._authorize(context)
            with _status_on_error(context):
                yield from method(request, context)
        return call

    def _info(self, request: bytes, context) -> bytes:
        wire.decode(request, "info_request")
        return wire.encode("info", {**self.core.describe(), "max_message_bytes": self.max_message_bytes,
                                    "session_ttl_s": self.sessions.ttl_s,
                                    "idle_timeout_s": self.sessions.idle_s})

    def _open_session(self, request: bytes, context) -> bytes:
        frame = wire.decode(request, "open_session")
        state, purpose = self.core.open_session(frame.header, frame.blobs)
        session = self.sessions.create(state, purpose)
        print(f"helix provider: session {session.id[:8]}… opened ({purpose}; {self.sessions.live_count()} live)",
              file=sys.stderr, flush=True)
        return wire.encode("session_opened", {"session": session.id, "purpose": purpose,
                                              "ttl_s": self.sessions.ttl_s, "idle_timeout_s": self.sessions.idle_s})

    def _lease(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        session_id = wire.decode(request, "lease").field("session", str)
        with self.sessions.use(session_id) as session:
            if session.leased:
                raise LinalignError(f"session {session_id[:8]}… already has a lease stream")
            session.leased, ended = True, session.ended
        context.add_callback(lambda: self.sessions.end(session_id, "client went away (lease stream closed)"))
        while context.is_active() and not ended.wait(HEARTBEAT_S):
            yield wire.encode("heartbeat")

    def _query(self, request: bytes, context) -> bytes:
        frame = wire.decode(request, "query")
        with self.sessions.use(frame.field("session", str)) as session:
            fields, blobs = self.core.query(session.state, frame.header, frame.blobs)
        return wire.encode("query_result", fields, blobs)

    def _close_session(self, request: bytes, context) -> bytes:
        session_id = wire.decode(request, "close_session").field("session", str)
        was_live = self.sessions.end(session_id, "closed by the client")
        return wire.encode("session_closed", {"was_live": was_live})

    def _fit(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        frames = (wire.decode(r, ("fit_start", "fit_batch", "fit_end")) for r in requests)
        start = next(frames, None)
        if start is None or start.kind != "fit_start":
            raise wire.WireError("a Fit stream must begin with a 'fit_start' message")
        with self.sessions.use(start.field("session", str)) as session:
            def batches() -> Iterator[tuple[dict, tuple[bytes, ...]]]:
                for frame in frames:
                    if session.ended.is_set():
                        raise SessionError(f"session ended during the fit: {session.end_reason}")
                    if frame.kind == "fit_end":
                        return
                    if frame.kind != "fit_batch":
                        raise wire.WireError(f"unexpected {frame.kind!r} message inside a fit")
                    yield frame.header, frame.blobs
                raise LinalignError("the client closed the fit stream before sending 'fit_end'")

            for fields, blobs in self.core.fit(session.state, start.header, batches(),
                                               max_reply_bytes=self.max_message_bytes // 2):
                yield wire.encode("fit_result", fields, blobs)


@contextlib.contextmanager
def _status_on_error(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn exceptions into gRPC status codes with one-line messages (payloads never appear in them)."""
    try:
        yield
    except grpc.RpcError:  # reading a stream the client abandoned: nobody is left to answer
        print("helix provider: a streaming call ended early: the client went away", file=sys.stderr, flush=True)
    except SessionError as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except CapacityError as e:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except LinalignError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Exception as e:
        print(f"helix provider: internal error {type(e).__name__}:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        context.abort(grpc.StatusCode.INTERNAL, f"internal provider error ({type(e).__name__}); see provider log")
