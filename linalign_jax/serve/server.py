"""The HELIX provider as a gRPC service over raw bytes (generic handlers, `wire` frames; no protobuf codegen).

Methods of `linalign.helix.v1.Provider`:

    Info          unary   -> public facts the client needs for keygen (shapes, ring preset, public set, limits)
    OpenSession   unary   -> the client uploads its key bundle once; returns a session id
    Lease         stream  <- heartbeats for as long as the session lives; when this stream breaks (the client died or
                             lost the network) the provider ends the session and frees its keys at once
    Query         unary   -> ciphertext(s) in, encrypted logits out
    Fit           bidi    -> the secure map fit: encrypted public-set columns in, Enc(Z_Aᵀ Z_B) out (paper §3.2)
    Bulk          bidi    -> many queries per call: feature-major ciphertexts in (thousands of queries each), the k
                             result ciphertexts out
    CloseSession  unary

Everything cryptographic lives behind `core` (`linalign_jax.helix.protocol.ProviderCore`); this module does transport.
Defences, in the order a request meets them:
- an interceptor checks the bearer token from the call's metadata before gRPC reads any request body (every method
  is registered request-streaming, so the handler, not gRPC, pulls the body), so an unauthenticated client can make
  the provider neither buffer a message nor hold a thread;
- `maximum_concurrent_rpcs` equals the thread pool (sessions' lease streams + working threads): calls beyond it are
  refused with RESOURCE_EXHAUSTED instead of queueing without bound;
- a server-side deadline per call (`call_timeout_s`; a fit gets the session TTL) cancels a client that sends slowly
  or never finishes;
- the message cap (`max_message_bytes`) is sized by the caller to the largest real request;
- per-client session limits and an optional per-session query quota (`sessions.SessionStore`);
- TLS is required off loopback unless `allow_plaintext`.
Errors reach the client as gRPC status codes with one-line messages; the provider never logs request payloads.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import sys
import threading
import traceback
from typing import Any, Callable, Iterator

import grpc

from linalign_jax.errors import LinalignError
from linalign_jax.serve import auth, wire
from linalign_jax.serve.sessions import CapacityError, SessionError, SessionStore

SERVICE = "linalign.helix.v1.Provider"
HEARTBEAT_S = 2.0
UNAUTHENTICATED_MESSAGE = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


# Request-streaming, so gRPC calls it without reading a request message first.
_REFUSE = grpc.stream_unary_rpc_method_handler(_refuse)


class _Authenticate(grpc.ServerInterceptor):
    """Refuses a call whose metadata lacks the bearer token before any of its body is read."""

    def __init__(self, token: str):
        self._token = token

    def intercept_service(self, continuation, details):
        if auth.is_authorized(details.invocation_metadata, self._token):
            return continuation(details)
        return _REFUSE


class ProviderServer:
    """A running provider: `start()` binds and serves, `stop()` ends every session and shuts the server down."""

    def __init__(self, core: Any, *, token: str, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[str, str] | None = None, allow_plaintext: bool = False, max_sessions: int = 64,
                 max_sessions_per_client: int = 16, max_queries_per_session: int = 0,
                 session_ttl_s: float = 3600.0, idle_timeout_s: float = 300.0, call_timeout_s: float = 300.0,
                 max_message_bytes: int | None = None, workers: int = 8, sessions: SessionStore | None = None,
                 facts: dict | None = None, allow_insecure_preset_for_tests: bool = False):
        preset = core.describe().get("preset")
        if preset is not None and not allow_insecure_preset_for_tests:
            from linalign_jax.helix import PRESETS

            if preset not in PRESETS or not PRESETS[preset].secure:
                raise LinalignError(f"CKKS preset {preset!r} is below 128-bit security: it is for tests only "
                                    f"(--allow_insecure_preset_for_tests)")
        if tls is None and not is_loopback(host) and not allow_plaintext:
            raise LinalignError(f"serving on {host} without TLS would send the bearer token and ciphertexts in the "
                                f"clear: give --tls_cert and --tls_key, or --allow_plaintext on a trusted network")
        if call_timeout_s <= 0 or workers < 1:
            raise LinalignError(f"call_timeout_s must be > 0 and workers >= 1, got {call_timeout_s}, {workers}")
        self.core, self.host, self.facts = core, host, dict(facts or {})
        max_message_bytes = max_message_bytes or largest_request_bytes(core)
        self.sessions = sessions or SessionStore(core.release, max_sessions=max_sessions, ttl_s=session_ttl_s,
                                                 idle_s=idle_timeout_s, max_per_client=max_sessions_per_client,
                                                 max_queries=max_queries_per_session)
        self.max_message_bytes, self.call_timeout_s = max_message_bytes, call_timeout_s
        # Each live lease parks one thread, so the pool has room for every session plus the working threads; calls
        # beyond the pool are refused (RESOURCE_EXHAUSTED), never queued.
        threads = self.sessions.max_sessions + workers
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="helix-rpc")
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.server(self._pool, interceptors=[_Authenticate(token)], options=options,
                                   maximum_concurrent_rpcs=threads)
        self._server.add_generic_rpc_handlers((self._handlers(),))
        address = f"{host}:{port}"
        try:
            self.port = (self._server.add_secure_port(address, auth.server_credentials(*tls)) if tls
                         else self._server.add_insecure_port(address))
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise LinalignError(f"cannot bind the provider to {address} (port in use or address not local?)")

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
        unary = {"Info": self._info, "OpenSession": self._open_session, "Query": self._query,
                 "CloseSession": self._close_session}
        handlers = {name: grpc.stream_unary_rpc_method_handler(self._guard(method), _identity, _identity)
                    for name, method in unary.items()}
        handlers["Lease"] = grpc.stream_stream_rpc_method_handler(self._guard_stream(self._lease, single=True),
                                                                  _identity, _identity)
        for name, method in (("Fit", self._fit), ("Bulk", self._bulk)):
            handlers[name] = grpc.stream_stream_rpc_method_handler(self._guard_stream(method, single=False),
                                                                   _identity, _identity)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _guard(self, method: Callable[[bytes, grpc.ServicerContext], bytes]):
        def call(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            with _deadline(context, self.call_timeout_s), _status_on_error(context):
                return method(_single(requests), context)
        return call

    def _guard_stream(self, method: Callable[[Any, grpc.ServicerContext], Iterator[bytes]], single: bool):
        def call(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            with _deadline(context, self.sessions.ttl_s), _status_on_error(context):
                yield from method(_single(requests) if single else requests, context)
        return call

    def _info(self, request: bytes, context) -> bytes:
        wire.decode(request, "info_request")
        return wire.encode("info", {**self.core.describe(), "provider": self.facts,
                                    "max_message_bytes": self.max_message_bytes,
                                    "session_ttl_s": self.sessions.ttl_s, "idle_timeout_s": self.sessions.idle_s,
                                    "max_queries_per_session": self.sessions.max_queries})

    def _open_session(self, request: bytes, context) -> bytes:
        frame = wire.decode(request, "open_session")
        state, purpose = self.core.open_session(frame.header, frame.blobs)
        session = self.sessions.create(state, purpose, client=_client_host(context))
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
        yield wire.encode("heartbeat")  # at once: the client waits for it before it uses the session
        while context.is_active() and not ended.wait(HEARTBEAT_S):
            yield wire.encode("heartbeat")

    def _query(self, request: bytes, context) -> bytes:
        frame = wire.decode(request, "query")
        with self.sessions.use(frame.field("session", str), queries=len(frame.blobs)) as session:
            fields, blobs = self.core.query(session.state, frame.header, frame.blobs)
        return wire.encode("query_result", fields, blobs)

    def _close_session(self, request: bytes, context) -> bytes:
        session_id = wire.decode(request, "close_session").field("session", str)
        was_live = self.sessions.end(session_id, "closed by the client")
        return wire.encode("session_closed", {"was_live": was_live})

    def _fit(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self._stream(requests, "fit", self.core.fit, lambda start: 0)

    def _bulk(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self._stream(requests, "bulk", self.core.bulk, lambda start: start.field("n", int))

    def _stream(self, requests: Iterator[bytes], name: str, run, quota) -> Iterator[bytes]:
        """A `<name>_start`, `<name>_batch`…, `<name>_end` stream in, `<name>_result` messages out; `quota(start)` is
        what it spends of the session's query quota."""
        kinds = (f"{name}_start", f"{name}_batch", f"{name}_end")
        frames = (wire.decode(r, kinds) for r in requests)
        start = next(frames, None)
        if start is None or start.kind != kinds[0]:
            raise wire.WireError(f"a {name} stream must begin with a {kinds[0]!r} message")
        with self.sessions.use(start.field("session", str), queries=quota(start)) as session:
            def batches() -> Iterator[tuple[dict, tuple[bytes, ...]]]:
                for frame in frames:
                    if session.ended.is_set():
                        raise SessionError(f"session ended during the {name} call: {session.end_reason}")
                    if frame.kind == kinds[2]:
                        return
                    if frame.kind != kinds[1]:
                        raise wire.WireError(f"unexpected {frame.kind!r} message inside a {name} call")
                    yield frame.header, frame.blobs
                raise LinalignError(f"the client closed the {name} stream before sending {kinds[2]!r}")

            for fields, blobs in run(session.state, start.header, batches(),
                                     max_reply_bytes=self.max_message_bytes // 2):
                yield wire.encode(f"{name}_result", fields, blobs)


def _identity(data: bytes) -> bytes:
    return data


def largest_request_bytes(core: Any) -> int:
    """The message cap a provider needs: its largest real request (a key bundle for the base head or for the secure
    fit's layout with the most rotation keys, or a call with the most ciphertexts), plus 1 MiB for headers.

    Sizes come from honest templates (`helix.validate`): a key bundle is the context, the public key and one
    fixed-size key per rotation, so the fit's worst bundle is extrapolated from the base layout's keys per rotation
    (an upper bound: the per-map overhead is counted once per key)."""
    from linalign_jax.helix import plan_layout
    from linalign_jax.helix.presets import canonical_context_bytes, get_preset
    from linalign_jax.helix.protocol import MAX_QUERIES_PER_CALL
    from linalign_jax.helix.validate import templates_for

    info = core.describe()
    preset = info.get("preset")
    base = plan_layout(info["head"]["d"], info["head"]["k"], preset)
    from linalign_jax.helix.bulk import BulkLayout

    # the bulk layout's templates are built here too, so the first bulk session does not wait for them
    layouts = [base, BulkLayout(info["head"]["d"], info["head"]["k"], **({"preset": preset} if preset else {}))]
    if "fit" in info:
        fit = info["fit"]
        layouts.append(max((plan_layout(fit["block"], r, preset) for r in range(1, fit["d"] + 1)),
                           key=lambda layout: len(layout.rotation_indices())))
    largest = 0
    for layout in layouts:
        reference = base if base.preset == layout.preset and base.rotation_indices() and layout.kind == "linear" \
            else layout
        t = templates_for(reference)
        per_key = len(t.rotation_keys.reference) / len(reference.rotation_indices()) if t.rotation_keys else 0
        bundle = (len(canonical_context_bytes(get_preset(layout.preset))) + len(t.public_key.reference)
                  + per_key * len(layout.rotation_indices()))
        largest = max(largest, int(bundle), MAX_QUERIES_PER_CALL * len(t.ciphertext.reference))
    return largest + (1 << 20)


def _single(requests: Iterator[bytes]) -> bytes:
    request = next(requests, None)
    if request is None:  # the client half-closed without a message, or the deadline cancelled the call
        raise wire.WireError("the call carried no request message")
    return request


def _client_host(context: grpc.ServicerContext) -> str:
    """The peer's address without its port ('ipv4:127.0.0.1:5555' -> 'ipv4:127.0.0.1'): sessions are counted per
    client host."""
    return context.peer().rsplit(":", 1)[0]


@contextlib.contextmanager
def _deadline(context: grpc.ServicerContext, seconds: float) -> Iterator[None]:
    """Cancel the call after `seconds` whatever the client's own deadline: a client that never finishes sending (or
    never stops a stream) cannot hold a thread longer."""
    timer = threading.Timer(seconds, context.cancel)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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
    except (LinalignError, RecursionError, MemoryError) as e:  # RecursionError: JSON nesting; MemoryError: a size
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, _one_line(e))
    except Exception as e:
        print(f"helix provider: internal error {type(e).__name__}:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        context.abort(grpc.StatusCode.INTERNAL, f"internal provider error ({type(e).__name__}); see provider log")


def _one_line(error: BaseException) -> str:
    text = str(error).replace("\n", " ")
    return f"{type(error).__name__}: {text}" if not isinstance(error, LinalignError) else text
