"""The client's two jobs against a remote provider, with the measurements the binaries and benchmarks report.

`classify` runs one session per call (fresh keys, paper §3.3) and one query per RPC, timing each query end to end
(encrypt → send → provider eval → receive → decrypt). `secure_fit` runs the secure map fit of paper §3.2 over one
fit session and returns the map only when every result ciphertext arrived and decrypted.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.helix.protocol import BASE_HEAD, MAX_QUERIES_PER_CALL, BulkClient, QueryClient, SecureFitClient
from linalign_jax.io_utils import Progress
from linalign_jax.serve.client import ProviderClient


@dataclasses.dataclass
class QueryRun:
    logits: np.ndarray  # [n, k]
    latency_s: np.ndarray  # [n] per query, end to end
    bytes_up: np.ndarray  # [n] request message bytes
    bytes_down: np.ndarray  # [n] reply message bytes
    setup_s: float  # keygen + bundle upload
    setup_bytes: int  # key bundle and session messages

    def summary(self) -> dict[str, float]:
        ms = self.latency_s * 1e3
        return {"queries": int(len(ms)), "latency_ms_p50": float(np.percentile(ms, 50)),
                "latency_ms_p99": float(np.percentile(ms, 99)), "latency_ms_mean": float(ms.mean()),
                "bytes_up_per_query": float(self.bytes_up.mean()),
                "bytes_down_per_query": float(self.bytes_down.mean()),
                "bytes_per_query": float((self.bytes_up + self.bytes_down).mean()),
                "session_setup_s": self.setup_s, "session_setup_bytes": self.setup_bytes}


def classify(client: ProviderClient, Z: np.ndarray, *, head: str = BASE_HEAD, k: int, input_bound: float,
             preset: str | None = None, timeout_s: float = 30.0, progress: str | None = "helix queries") -> QueryRun:
    """Encrypted logits for the mapped embeddings Z [n, d] from the provider's head `head` (k classes)."""
    Z = _queries(Z)
    start = time.perf_counter()
    party = QueryClient(Z.shape[1], k, input_bound, head, preset)

    def run(session, logits, latency, up, down) -> None:
        bar = Progress(progress, len(Z), "queries") if progress else None
        for i, z in enumerate(Z):
            t0 = time.perf_counter()
            reply = session.query({}, [party.encrypt(z)], timeout_s=timeout_s)
            if len(reply.blobs) != 1:
                raise LinalignError(f"provider answered query {i} with {len(reply.blobs)} ciphertexts, expected 1")
            logits[i] = party.decrypt(reply.blobs[0])
            latency[i] = time.perf_counter() - t0
            up[i], down[i] = reply.bytes_up, reply.bytes_down
            if bar:
                bar.update()
        if bar:
            bar.close()

    return _session_run(client, party, len(Z), k, start, run)


def classify_bulk(client: ProviderClient, Z: np.ndarray, *, head: str = BASE_HEAD, k: int, input_bound: float,
                  preset: str | None = None, timeout_s: float = 600.0) -> QueryRun:
    """Encrypted logits for Z [n, d] in bulk: one session, one streamed call per `slots` queries (feature-major, so
    each ciphertext carries thousands of queries). Latency and bytes per query are the call's, amortised over its
    queries."""
    Z = _queries(Z)
    start = time.perf_counter()
    party = BulkClient(Z.shape[1], k, input_bound, head, preset)

    def run(session, logits, latency, up, down) -> None:
        for lo in range(0, len(Z), party.slots):
            batch, span = Z[lo:lo + party.slots], slice(lo, lo + party.slots)
            t0, results, sent, received = time.perf_counter(), [], 0, 0
            for reply in session.bulk({"n": len(batch)}, party.batches(batch, MAX_QUERIES_PER_CALL),
                                      timeout_s=timeout_s):
                results.extend(reply.blobs)
                sent, received = sent + reply.bytes_up, received + reply.bytes_down
            if len(results) != k:
                raise LinalignError(f"the provider answered a bulk call with {len(results)} results, expected {k}")
            logits[span] = party.decrypt(results)
            latency[span] = (time.perf_counter() - t0) / len(batch)
            up[span], down[span] = sent / len(batch), received / len(batch)

    return _session_run(client, party, len(Z), k, start, run)


def _session_run(client: ProviderClient, party, n: int, k: int, start: float, run) -> QueryRun:
    """Open one session for `party`, let `run` fill logits / latency / bytes for the n queries, always free the keys."""
    try:
        with client.open_session(party.open_fields(), [party.bundle()]) as session:
            setup_s = time.perf_counter() - start
            logits = np.zeros((n, k))
            latency, up, down = (np.zeros(n) for _ in range(3))
            run(session, logits, latency, up, down)
            return QueryRun(logits, latency, up, down, setup_s, session.setup_bytes)
    finally:
        party.close()


def _queries(Z: np.ndarray) -> np.ndarray:
    Z = np.asarray(Z, np.float64)
    if Z.ndim != 2 or not len(Z):
        raise LinalignError(f"queries must be a non-empty [n, d] array, got shape {Z.shape}")
    return Z


@dataclasses.dataclass
class FitRun:
    affine: object  # AffineMap
    info: dict


def secure_fit(client: ProviderClient, Z_B: np.ndarray, *, rank: int = 0, lam: float | str = "auto",
               batch_columns: int = 8, timeout_s: float = 3600.0) -> FitRun:
    """Fit the map from the client's public-set embeddings Z_B with the provider's (which never leave it)."""
    info = client.info()
    if "fit" not in info:
        raise LinalignError(f"provider at {client.target} serves no public set, so it cannot run a secure fit")
    start = time.perf_counter()
    party = SecureFitClient(Z_B, info["fit"], rank=rank, batch_columns=batch_columns)
    keygen_s = time.perf_counter() - start
    bytes_up = bytes_down = 0
    try:
        with client.open_session(party.open_fields(), [party.bundle()]) as session:
            setup_bytes = session.setup_bytes
            replies = []
            for reply in session.fit(party.start_fields(), party.batches(), timeout_s=timeout_s):
                bytes_up += reply.bytes_up
                bytes_down += reply.bytes_down
                replies.append((reply.fields, reply.blobs))
            exchange_s = time.perf_counter() - start - keygen_s
        solve_start = time.perf_counter()
        affine, fit_info = party.solve(replies, lam)
        solve_s = time.perf_counter() - solve_start
    finally:
        party.close()
    fit_info.update(fit_seconds=time.perf_counter() - start, keygen_seconds=keygen_s, exchange_seconds=exchange_s,
                    decrypt_solve_seconds=solve_s, key_bundle_bytes=setup_bytes, bytes_up=bytes_up,
                    bytes_down=bytes_down, bytes_total=setup_bytes + bytes_up + bytes_down,
                    input_bound=party.input_bound, layout=party.layout.to_json())
    return FitRun(affine, fit_info)
