"""Reliability and security of a real provider process on localhost (issue 6 item 4).

Every bad request must get a clear error while the provider keeps serving; sessions must end when clients vanish;
a fit interrupted by the provider's death must never leave a map behind.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

from tests.serve.conftest import D_A, D_B, K, PRESET, REPO, ProviderProcess

pytest.importorskip("openfhe")  # the provider's CKKS engine runs on CPython 3.10 only

from linalign_jax.helix.protocol import QueryClient  # noqa: E402
from linalign_jax.serve import wire  # noqa: E402
from linalign_jax.serve.client import RemoteError  # noqa: E402
from linalign_jax.serve.parties import classify, secure_fit  # noqa: E402


def plaintext_logits(artefacts, Z):
    head = artefacts["head"]
    return Z @ head.V + head.c


def query_client(d=D_A, k=K, bound=4.0):
    return QueryClient(d, k, bound, preset=PRESET)


def assert_still_serving(client, artefacts):
    Z = np.random.default_rng(7).normal(size=(1, D_A)) * 0.5
    run = classify(client, Z, k=K, input_bound=4.0, preset=PRESET, progress=None)
    np.testing.assert_allclose(run.logits, plaintext_logits(artefacts, Z), rtol=1e-4, atol=1e-4)


def test_classify_matches_plaintext_head(provider, client_for, artefacts):
    client = client_for(provider)
    info = client.info()
    assert info["head"]["d"] == D_A and info["head"]["k"] == K and info["fit"]["n"] == len(artefacts["Z_A"])
    Z = np.random.default_rng(1).normal(size=(6, D_A)) * 0.5
    run = classify(client, Z, k=K, input_bound=4.0, preset=PRESET, progress=None)
    np.testing.assert_allclose(run.logits, plaintext_logits(artefacts, Z), rtol=1e-4, atol=1e-4)
    assert (run.bytes_up > 0).all() and (run.bytes_down > 0).all() and run.setup_bytes > 0


def test_wrong_or_missing_token_is_rejected(provider, client_for, artefacts):
    for token in ("not-the-token-0123456789", artefacts["token"][:-1] + "x"):
        with pytest.raises(RemoteError, match="UNAUTHENTICATED.*bearer token") as e:
            client_for(provider, token=token).info()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    channel = grpc.insecure_channel(provider.target)
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/linalign.helix.v1.Provider/Info")(wire.encode("info_request"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    assert_still_serving(client_for(provider), artefacts)


class _LayoutWithoutGiantSteps:
    """The head's layout, but keygen skips its giant-step rotations: a bundle with missing keys."""

    def __init__(self, layout):
        self._layout = layout

    def __getattr__(self, name):
        return getattr(self._layout, name)

    def rotation_indices(self):
        return tuple(r for r in self._layout.rotation_indices() if r < self._layout.n1)


def _bundle_missing_keys():
    from linalign_jax.helix import ClientSession

    party = query_client()
    return ClientSession.create(_LayoutWithoutGiantSteps(party.layout), 4.0).bundle()


def _bad_requests(client):
    """(name, method, kind, fields, blobs, expected code, message pattern) for each bad request."""
    own, other = query_client(), query_client()
    session = client.open_session(own.open_fields(), [own.bundle()])
    z = np.full(D_A, 0.1)
    cases = [
        ("garbage bytes", "Query", None, None, [b"\x00garbage"], grpc.StatusCode.INVALID_ARGUMENT, "HELIX magic"),
        ("unknown session", "Query", "query", {"session": "f" * 32}, [own.encrypt(z)], grpc.StatusCode.NOT_FOUND,
         "unknown session"),
        ("malformed ciphertext", "Query", "query", {"session": session.id}, [b"\x01" * 200],
         grpc.StatusCode.INVALID_ARGUMENT, "HELIX magic"),
        ("truncated ciphertext", "Query", "query", {"session": session.id}, [own.encrypt(z)[:-100]],
         grpc.StatusCode.INVALID_ARGUMENT, "declares [0-9]+ payload bytes but carries"),
        ("ciphertext of another session", "Query", "query", {"session": session.id}, [other.encrypt(z)],
         grpc.StatusCode.INVALID_ARGUMENT, "not this session's key"),
        ("wrong dimension", "OpenSession", "open_session", {"purpose": "query", "head": "base"},
         [query_client(d=D_A // 2).bundle()], grpc.StatusCode.INVALID_ARGUMENT, "layout"),
        ("missing rotation keys", "OpenSession", "open_session", {"purpose": "query", "head": "base"},
         [_bundle_missing_keys()], grpc.StatusCode.INVALID_ARGUMENT, "rotation keys: [0-9]+ bytes, but an honest one"),
        ("unknown head", "OpenSession", "open_session", {"purpose": "query", "head": "fit-0000"}, [own.bundle()],
         grpc.StatusCode.INVALID_ARGUMENT, "no head 'fit-0000'"),
        ("oversized message", "Query", "query", {"session": session.id}, [b"\x00" * (17 << 20)],
         grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ("wrong field type", "Query", "query", {"session": 5}, [own.encrypt(z)], grpc.StatusCode.INVALID_ARGUMENT,
         "'session' = 5"),
    ]
    return session, own, other, cases


def test_bad_requests_get_clear_errors_and_provider_keeps_serving(provider, client_for, artefacts):
    client = client_for(provider, max_message_bytes=64 << 20)
    session, own, other, cases = _bad_requests(client)
    for name, method, kind, fields, blobs, code, pattern in cases:
        request = blobs[0] if kind is None else wire.encode(kind, fields, blobs)
        with pytest.raises(grpc.RpcError) as e:
            client.call_raw(method, request, timeout_s=30)
        assert e.value.code() == code, (name, e.value.details())
        assert re.search(pattern, e.value.details() or ""), (name, e.value.details())
        # the good session still answers after every bad request
        logits = own.decrypt(session.query({}, [own.encrypt(np.full(D_A, 0.1))]).blobs[0])
        np.testing.assert_allclose(logits, plaintext_logits(artefacts, np.full(D_A, 0.1)), rtol=1e-4, atol=1e-4)
    session.close()
    own.close()
    other.close()
    assert_still_serving(client, artefacts)


def test_concurrent_clients(provider, client_for, artefacts):
    """16 clients, each with its own channel and session, 100 queries each: no errors, exact logits."""
    clients, queries = 16, 100
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(clients, queries, D_A)) * 0.5

    def one_client(i):
        return classify(client_for(provider), Z[i], k=K, input_bound=4.0, preset=PRESET, progress=None)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(one_client, range(clients)))
    latency = np.concatenate([r.latency_s for r in runs]) * 1e3
    for i, run in enumerate(runs):
        np.testing.assert_allclose(run.logits, plaintext_logits(artefacts, Z[i]), rtol=1e-4, atol=1e-4)
    print(f"\n16 clients x 100 queries: p50 {np.percentile(latency, 50):.1f} ms, "
          f"p99 {np.percentile(latency, 99):.1f} ms, 0 errors")


def test_secure_fit_matches_plaintext_ridge(provider, client_for, artefacts):
    from linalign_jax.align.ridge import fit_ridge

    client = client_for(provider)
    run = secure_fit(client, artefacts["Z_B"], lam=0.5)
    Z_B, Z_A = artefacts["Z_B"], artefacts["Z_A"]
    queries = Z_B[:4]
    mapped = queries @ run.affine.W.astype(np.float64) + run.affine.b
    got = classify(client, mapped, head=run.info["helix_head"], k=K, input_bound=8.0, preset=PRESET,
                   progress=None).logits
    ref, _ = fit_ridge(Z_B, Z_A, lam=0.5)  # the plaintext ridge map with the provider's base head
    want = plaintext_logits(artefacts, queries @ np.asarray(ref.W, np.float64) + np.asarray(ref.b))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert run.info["bytes_total"] > run.info["key_bundle_bytes"] > 0


def test_tls_provider(artefacts, client_for):
    if artefacts["tls"] is None:
        pytest.skip("no openssl CLI to make a self-signed certificate")
    cert, key = artefacts["tls"]
    root = artefacts["root"]
    proc = ProviderProcess(root, head=root / "head", token_file=root / "token", tls_cert=cert, tls_key=key)
    try:
        secure = client_for(proc, tls_ca=str(cert), tls_server_name="localhost")
        assert_still_serving(secure, artefacts)
        with pytest.raises(RemoteError, match="unavailable.*hint: if the provider serves TLS, give --tls_ca"):
            client_for(proc, timeout_s=5).info()  # plaintext client against a TLS port
        with pytest.raises(RemoteError, match="Hostname Verification.*hint: .*--tls_server_name.*subjectAltName"):
            client_for(proc, tls_ca=str(cert), tls_server_name="provider.example.org", timeout_s=5).info()
    finally:
        proc.stop()


def _client_script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def test_client_killed_mid_session_frees_it(artefacts):
    """The session ends because its lease stream breaks, not by the (here 10-minute) idle timeout."""
    root = artefacts["root"]
    provider = ProviderProcess(root, head=root / "head", token_file=root / "token", idle_timeout_s=600)
    script = f"""
        import time
        from linalign_jax.helix.protocol import QueryClient
        from linalign_jax.serve.client import ProviderClient
        client = ProviderClient("{provider.target}", token=open("{root / 'token'}").read())
        party = QueryClient({D_A}, {K}, 4.0, preset="{PRESET}")
        session = client.open_session(party.open_fields(), [party.bundle()])
        print(session.id, flush=True)
        time.sleep(600)
    """
    proc = subprocess.Popen(_client_script(script), cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        session_id = proc.stdout.readline().strip()
        assert session_id, "client script did not open a session"
        provider.wait_for_line(f"session {session_id[:8]}… opened")
        proc.kill()
        proc.wait()
        line = provider.wait_for_line(f"session {session_id[:8]}… freed", timeout=60)
        assert "client went away" in line
    finally:
        if proc.poll() is None:
            proc.kill()
        provider.stop()


def test_provider_killed_during_fit_leaves_no_map(artefacts, tmp_path):
    root = artefacts["root"]
    big_b = np.random.default_rng(5).normal(size=(4096, 4 * D_B)) * 0.2  # a fit of 2 blocks x 192 columns
    big_a = big_b @ np.random.default_rng(6).normal(size=(4 * D_B, D_A)) * 0.05
    np.save(tmp_path / "a.npy", big_a)
    np.save(tmp_path / "b.npy", big_b)
    proc = ProviderProcess(root, head=root / "head", public_features=tmp_path / "a.npy", public_name="big",
                           token_file=root / "token")
    map_out = tmp_path / "secure_map"
    client = subprocess.Popen(
        [sys.executable, "-m", "experiments.helix_client", "--mode=fit", f"--provider={proc.target}",
         f"--token_file={root / 'token'}", f"--public_features={tmp_path / 'b.npy'}", f"--map_out={map_out}",
         "--batch_columns=1", "--allow_insecure_preset_for_tests"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"})
    try:
        proc.wait_for_line(r"opened \(fit", timeout=120)
        time.sleep(1.0)  # the provider is now evaluating column ciphertexts
        proc.kill()
        _, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
        proc.stop()
    assert client.returncode != 0
    assert "unavailable" in err and "Fit" in err, err[-2000:]
    assert not map_out.exists() and not list(tmp_path.glob(".secure_map*"))



def test_client_binary_fits_then_classifies(provider, artefacts, tmp_path):
    """`experiments.helix_client`: a secure rank-8 fit saved as a map, then classification with it."""
    root, env = artefacts["root"], {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
    common = [sys.executable, "-m", "experiments.helix_client", f"--provider={provider.target}",
              f"--token_file={root / 'token'}", "--allow_insecure_preset_for_tests"]
    np.save(tmp_path / "b.npy", artefacts["Z_B"])
    fit = subprocess.run(common + ["--mode=fit", f"--public_features={tmp_path / 'b.npy'}", "--rank=8",
                                   f"--map_out={tmp_path / 'map'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-2000:]
    from linalign_jax.align import load_map
    from linalign_jax.serve.heads import HeadStore

    affine, meta = load_map(tmp_path / "map")
    assert meta["rank"] == 8 and meta["helix_head"].startswith("fit-") and affine.target_dim == 8
    queries, labels = artefacts["Z_B"][:5], np.arange(5) % K
    np.save(tmp_path / "q.npy", queries)
    np.save(tmp_path / "y.npy", labels)
    out = tmp_path / "predictions.json"
    run = subprocess.run(common + ["--mode=classify", f"--map={tmp_path / 'map'}", f"--features={tmp_path / 'q.npy'}",
                                   f"--labels={tmp_path / 'y.npy'}", f"--out={out}",
                                   f"--plaintext_head={root / 'state' / 'heads' / meta['helix_head']}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    fitted = HeadStore(root / "state" / "heads")[meta["helix_head"]]  # the provider persisted its fitted head
    want = (queries @ affine.W + affine.b) @ fitted.V + fitted.c
    np.testing.assert_allclose(result["logits"], want, rtol=1e-3, atol=1e-3)
    assert [p["prediction"] for p in result["predictions"]] == list(want.argmax(1))
    assert result["summary"]["accuracy"] == np.mean(want.argmax(1) == labels)
    assert result["summary"]["plaintext_accuracy"] == result["summary"]["accuracy"]  # printed side by side
    assert result["summary"]["prediction_agreement"] == 1.0 and "accuracy (plaintext)" in run.stdout
    assert all(p["latency_ms"] > 0 and p["bytes_up"] > 0 and p["bytes_down"] > 0 for p in result["predictions"])


def test_bulk_classify_matches_plaintext_head(provider, client_for, artefacts):
    """Served bulk: one streamed call carries every query feature-major; the logits equal the plaintext head's."""
    from linalign_jax.serve.parties import classify_bulk

    Z = np.random.default_rng(11).normal(size=(300, D_A)) * 0.5
    run = classify_bulk(client_for(provider), Z, k=K, input_bound=4.0, preset=PRESET)
    np.testing.assert_allclose(run.logits, plaintext_logits(artefacts, Z), rtol=1e-3, atol=1e-3)
    assert run.latency_s.shape == (300,) and (run.bytes_up > 0).all() and (run.bytes_down > 0).all()


def test_client_binary_classifies_from_an_embeddings_file(provider, artefacts, tmp_path):
    """Issue 12 item 4: `--model=<embeddings .parquet>` stands in for the client's model end to end (task CSV ->
    looked-up vectors -> local map -> encrypted head), with the plaintext head's predictions."""
    from linalign_jax.align import AffineMap, save_map
    from linalign_jax.data import load_dataset
    from linalign_jax.precomputed import write_embeddings

    rng = np.random.default_rng(3)
    texts = [f"synthetic text number {i}" for i in range(24)]
    (tmp_path / "task.csv").write_text("text,label\n" + "".join(f"{t},{i % 3}\n" for i, t in enumerate(texts)))
    vectors = rng.normal(size=(len(texts), D_A)) * 0.5
    write_embeddings(tmp_path / "client.parquet", texts, vectors, model="synthetic-embedder")
    save_map(tmp_path / "map", AffineMap(np.eye(D_A, dtype=np.float32), np.zeros(D_A, np.float32)),
             {"source_model": str(tmp_path / "client.parquet"), "normalize": False})
    out = tmp_path / "predictions.json"
    run = subprocess.run([sys.executable, "-m", "experiments.helix_client", f"--provider={provider.target}",
                          f"--token_file={artefacts['root'] / 'token'}", "--allow_insecure_preset_for_tests",
                          f"--map={tmp_path / 'map'}", f"--model={tmp_path / 'client.parquet'}",
                          f"--task_data={tmp_path / 'task.csv'}", "--nonormalize", "--bulk", f"--out={out}"],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    test_texts = list(load_dataset(tmp_path / "task.csv")["test"]["text"])
    Z = vectors[[texts.index(t) for t in test_texts]].astype(np.float32).astype(np.float64)
    result = json.loads(out.read_text())
    assert [p["prediction"] for p in result["predictions"]] == list(plaintext_logits(artefacts, Z).argmax(1))
    np.testing.assert_allclose(result["logits"], plaintext_logits(artefacts, Z), rtol=1e-3, atol=1e-3)
