"""Benchmark the HELIX engine (OpenFHE) against the paper's library (TenSEAL) on one encrypted linear head.

    python -m experiments.bench_helix --d=4096 --k=20 --json_out=/tmp/helix.json
    python -m experiments.bench_helix --sweep --json_out=/tmp/helix_sweep.json
    python -m experiments.bench_helix --fit_rank=64 --json_out=/tmp/helix_fit_r64.json     # secure fit only
    python -m experiments.bench_helix --fit_rank=0 --json_out=/tmp/helix_fit_full.json     # full rank (minutes)

Every result is sanitized (`linalign_jax.helix.sanitize`: fresh re-encryption and noise flooding per response), so the
numbers include that cost (`sanitize` is also timed on its own). Every timing is reported as wall and process-CPU
milliseconds (median over --repeats); run with OMP_NUM_THREADS=1 (the
targets are single-thread) and on a quiet machine: CPU time is the less noisy of the two on a shared one. TenSEAL runs
in the same process at the same security (128-bit, N=8192, depth-1 modulus chain [60, 40, 60], scale 2^40), on one
thread (n_threads=1).
Bulk mode encrypts `--bulk_distinct` distinct feature ciphertexts and reuses them cyclically (a valid batch whose
features repeat): the provider's cost per feature frame is the same, and the client-side encryption time per frame is
measured on the distinct ones.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import numpy as np
import openfhe as fhe
from absl import app, flags

from linalign_jax.helix import BulkLayout, BulkPlan, ClientSession, LinearPlan, ProviderSession, plan_layout
from linalign_jax.helix.frames import KIND_QUERY, frame, unframe
from linalign_jax.helix.sanitize import LAMBDA
from linalign_jax.io_utils import Progress, atomic_write_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("d", 4096, "Embedding dimension (input of the head).")
flags.DEFINE_integer("k", 20, "Number of classes (output of the head).")
flags.DEFINE_bool("sweep", False, "Sweep d in {384, 768, 2048, 4096} x k in {2, 6, 20, 128} instead of one (d, k).")
flags.DEFINE_integer("repeats", 7, "Timed repetitions per operation (median reported).")
flags.DEFINE_bool("bulk", True, "Also benchmark bulk (feature-major) mode.")
flags.DEFINE_integer("bulk_queries", 4096, "Queries per bulk batch (<= slots).")
flags.DEFINE_integer("bulk_distinct", 32, "Distinct feature ciphertexts encrypted per bulk batch (reused cyclically).")
flags.DEFINE_bool("tenseal", True, "Run TenSEAL in the same process for comparison.")
flags.DEFINE_bool("tenseal_matmul", True, "Include TenSEAL's vector-matrix matmul (tens of seconds at d=4096).")
flags.DEFINE_integer("fit_rank", None, "Benchmark only the secure fit at this rank (0 = full) instead of heads.")
flags.DEFINE_integer("fit_n", 4096, "Secure fit: public-set size.")
flags.DEFINE_integer("fit_d", 768, "Secure fit: embedding dimension of both parties.")
flags.DEFINE_string("json_out", None, "Write all measurements as JSON here.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic head and embeddings.")

SWEEP_D, SWEEP_K = (384, 768, 2048, 4096), (2, 6, 20, 128)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    """Median wall and CPU milliseconds of `fn` over `repeats` runs, and its last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"wall_ms": 1e3 * float(np.median(walls)), "cpu_ms": 1e3 * float(np.median(cpus))}, out


def synthetic_head(d: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heavy-tailed embeddings (Student t, 3 dof) and a head with logits of order 1."""
    x = rng.standard_t(3, size=(64, d))
    V = rng.normal(size=(d, k)) / np.sqrt(d)
    c = rng.normal(size=k)
    return x, V, c


def bench_openfhe(d: int, k: int, x: np.ndarray, V: np.ndarray, c: np.ndarray, repeats: int) -> dict[str, Any]:
    layout = plan_layout(d, k)
    bound = float(np.abs(x).max())
    r: dict[str, Any] = {"method": layout.method, "preset": layout.preset,
                         "rotation_keys": len(layout.rotation_indices()),
                         "queries_per_ciphertext": layout.queries_per_ciphertext}
    r["plan_build"], plan = timed(lambda: LinearPlan.build(layout, V, c), 1)
    r["keygen"], client = timed(lambda: ClientSession.create(layout, input_bound=bound), 1)
    r["bundle_serialize"], bundle = timed(client.bundle, 1)
    r["provider_load"], provider = timed(lambda: ProviderSession.load(bundle), 1)
    r["key_bytes"] = len(bundle)
    try:
        query_vec = x[0]
        r["encrypt"], query = timed(lambda: client.encrypt(query_vec), repeats)
        ct = provider._load(*unframe(query, KIND_QUERY), "query", level=0)
        r["serialize"], _ = timed(lambda: fhe.Serialize(ct, fhe.BINARY), repeats)
        r["head_eval"], result = timed(lambda: provider.evaluate(plan, query), repeats)
        r["transform"], acc = timed(lambda: plan.transform(provider.cc, ct), repeats)
        r["sanitize"], _ = timed(lambda: plan.finish(provider.cc, provider.public_key, acc, bound, 1), repeats)
        r["decrypt"], logits = timed(lambda: client.decrypt(result), repeats)
        r["end_to_end"], _ = timed(lambda: client.decrypt(provider.evaluate(plan, client.encrypt(query_vec))), repeats)
        ref = query_vec @ V + c
        r["max_rel_error"] = float(np.abs(logits - ref).max() / np.abs(ref).max())
        r["bytes_up"], r["bytes_down"] = len(query), len(result)
        r["bytes_per_query"] = (len(query) + len(result)) / layout.queries_per_ciphertext
    finally:
        provider.close()
        client.close()
    return r


def bench_bulk(d: int, k: int, x: np.ndarray, V: np.ndarray, c: np.ndarray) -> dict[str, Any]:
    layout = BulkLayout(d, k)
    n, distinct = FLAGS.bulk_queries, min(FLAGS.bulk_distinct, d)
    rows = np.random.default_rng(FLAGS.seed + 1).integers(0, len(x), n)
    batch = x[rows][:, np.arange(d) % distinct]  # n queries whose features repeat with period `distinct`
    client = ClientSession.create(layout, input_bound=float(np.abs(batch).max()))
    provider = ProviderSession.load(client.bundle())
    plan = BulkPlan.build(layout, V, c)
    try:
        enc, encrypted = timed(lambda: client.encrypt_bulk(batch, 0, distinct), 1)
        frames = [encrypted[j] if j < distinct else _as_feature(encrypted[j % distinct], j) for j in range(d)]
        ev, results = timed(lambda: provider.evaluate_bulk(plan, frames), 1)
        dec, y = timed(lambda: client.decrypt_bulk(results), 1)
        ref = batch @ V + c
        return {
            "queries": n,
            "encrypt_ms_per_query": {key: v * d / distinct / n for key, v in enc.items()},
            "eval_ms_per_query": {key: v / n for key, v in ev.items()},
            "decrypt_ms_per_query": {key: v / n for key, v in dec.items()},
            "bytes_up_per_query": sum(map(len, encrypted)) * d / distinct / n,
            "bytes_down_per_query": sum(map(len, results)) / n,
            "max_rel_error": float(np.abs(y - ref).max() / np.abs(ref).max()),
        }
    finally:
        provider.close()
        client.close()


def _as_feature(blob: bytes, j: int) -> bytes:
    """The same ciphertext re-labelled as feature j (valid: the batch's feature j equals feature j % distinct)."""
    header, payload = unframe(blob, KIND_QUERY)
    return frame(KIND_QUERY, dict(header, feature=j), payload)


def bench_tenseal(d: int, k: int, x: np.ndarray, V: np.ndarray, c: np.ndarray, repeats: int) -> dict[str, Any]:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 60], n_threads=1)
    ctx.global_scale = 2**40
    r: dict[str, Any] = {}
    r["keygen"], _ = timed(ctx.generate_galois_keys, 1)
    r["key_bytes"] = len(ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True,
                                       save_relin_keys=False))
    columns = [V[:, j].tolist() for j in range(k)]
    r["encrypt"], enc = timed(lambda: ts.ckks_vector(ctx, x[0].tolist()), repeats)
    r["dot"], outs = timed(lambda: [enc.dot(col) + float(cj) for col, cj in zip(columns, c)], max(1, repeats // 2))
    got = np.array([o.decrypt()[0] for o in outs])
    ref = x[0] @ V + c
    r["dot_max_rel_error"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    r["dot_bytes_down"] = sum(len(o.serialize()) for o in outs)
    r["bytes_up"] = len(enc.serialize())
    if FLAGS.tenseal_matmul:
        matrix = V.tolist()
        r["matmul"], out = timed(lambda: enc.matmul(matrix) + c.tolist(), 1)
        r["matmul_max_rel_error"] = float(np.abs(np.array(out.decrypt()) - ref).max() / np.abs(ref).max())
    return r


def run_config(d: int, k: int, progress: Progress) -> dict[str, Any]:
    rng = np.random.default_rng(FLAGS.seed)
    x, V, c = synthetic_head(d, k, rng)
    row: dict[str, Any] = {"d": d, "k": k, "sanitized": True, "statistical_lambda": LAMBDA,
                           "openfhe": bench_openfhe(d, k, x, V, c, FLAGS.repeats)}
    if FLAGS.bulk:
        row["bulk"] = bench_bulk(d, k, x, V, c)
    if FLAGS.tenseal:
        row["tenseal"] = bench_tenseal(d, k, x, V, c, FLAGS.repeats)
    o = row["openfhe"]
    row["head_eval_ms_p50"] = o["head_eval"]["wall_ms"]
    row["head_eval_cpu_ms_p50"] = o["head_eval"]["cpu_ms"]
    row["sanitize_ms_p50"] = o["sanitize"]["wall_ms"]
    row["end_to_end_ms_p50"] = o["end_to_end"]["wall_ms"]
    row["end_to_end_cpu_ms_p50"] = o["end_to_end"]["cpu_ms"]
    row["bytes_per_query"] = o["bytes_per_query"]
    row["key_bytes"] = o["key_bytes"]
    if FLAGS.bulk:
        row["bulk_eval_ms_per_query"] = row["bulk"]["eval_ms_per_query"]["wall_ms"]
        row["bulk_eval_cpu_ms_per_query"] = row["bulk"]["eval_ms_per_query"]["cpu_ms"]
    if FLAGS.tenseal:
        t = row["tenseal"]
        row["tenseal_dot_ms_p50"] = t["dot"]["wall_ms"]
        row["tenseal_dot_cpu_ms_p50"] = t["dot"]["cpu_ms"]
        row["speedup_vs_tenseal_dot_cpu"] = t["dot"]["cpu_ms"] / o["head_eval"]["cpu_ms"]
        row["speedup_vs_tenseal_dot_wall"] = t["dot"]["wall_ms"] / o["head_eval"]["wall_ms"]
        if "matmul" in t:
            row["tenseal_matmul_ms"] = t["matmul"]["wall_ms"]
            row["speedup_vs_tenseal_matmul_cpu"] = t["matmul"]["cpu_ms"] / o["head_eval"]["cpu_ms"]
    progress.update()
    return row


def bench_fit(n: int, d: int, rank: int) -> dict[str, Any]:
    """Both parties of one secure fit in this process (client encryption, provider evaluation, client solve): wall
    seconds, and the process's peak RSS (its growth over the start is the fit's memory)."""
    import resource

    from linalign_jax.helix.protocol import ProviderCore, PublicEmbeddings, SecureFitClient, ServedHead

    rng = np.random.default_rng(FLAGS.seed)
    Z_B = rng.normal(size=(n, d)) / np.sqrt(d)
    Z_A = Z_B @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.1 * rng.normal(size=(n, d)) / np.sqrt(d)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    w0, c0 = time.perf_counter(), time.process_time()
    core = ProviderCore(ServedHead(rng.normal(size=(d, 20)) / np.sqrt(d), np.zeros(20), tuple(map(str, range(20)))),
                        public=PublicEmbeddings.from_array("pub", Z_A))
    client = SecureFitClient(Z_B, core.describe()["fit"], rank=rank)
    state, _ = core.open_session(client.open_fields(), [client.bundle()])
    try:
        replies = list(core.fit(state, client.start_fields(), client.batches(), max_reply_bytes=64 << 20))
    finally:
        core.release(state)
    affine, info = client.solve(replies, lam=1.0)
    client.close()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"fit_n": n, "fit_d": d, "fit_rank": rank, "sanitized": True, "fit_wall_s": wall, "fit_cpu_s": cpu,
            "fit_peak_rss_mb": rss, "fit_rss_growth_mb": rss - rss0, "blocks": info["blocks"],
            "result_ciphertexts": sum(len(b) for _, b in replies), "rotation_keys": len(client.layout.rotation_indices())}


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = ["d", "k", "method", "rot keys", "head eval ms (cpu)", "e2e ms (cpu)", "enc / dec cpu ms",
               "KB up / down", "key MB", "bulk eval ms/q (cpu)", "TenSEAL dot ms (cpu)", "speedup (cpu)",
               "TenSEAL matmul ms", "rel err"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append(_markdown_row(r, r["openfhe"]))
    return "\n".join(lines)


def _markdown_row(r: dict[str, Any], o: dict[str, Any]) -> str:
    t, b = r.get("tenseal"), r.get("bulk")
    cells = [r["d"], r["k"], o["method"], o["rotation_keys"],
             f"{o['head_eval']['wall_ms']:.1f} ({o['head_eval']['cpu_ms']:.1f})",
             f"{o['end_to_end']['wall_ms']:.1f} ({o['end_to_end']['cpu_ms']:.1f})",
             f"{o['encrypt']['cpu_ms']:.1f} / {o['decrypt']['cpu_ms']:.1f}",
             f"{o['bytes_up'] / 1e3:.0f} / {o['bytes_down'] / 1e3:.0f}", f"{o['key_bytes'] / 1e6:.1f}",
             f"{b['eval_ms_per_query']['wall_ms']:.3f} ({b['eval_ms_per_query']['cpu_ms']:.3f})" if b else "-",
             f"{t['dot']['wall_ms']:.0f} ({t['dot']['cpu_ms']:.0f})" if t else "-",
             f"{t['dot']['cpu_ms'] / o['head_eval']['cpu_ms']:.1f}x" if t else "-",
             f"{t['matmul']['wall_ms']:.0f}" if t and "matmul" in t else "-",
             f"{o['max_rel_error']:.1e}"]
    return "| " + " | ".join(map(str, cells)) + " |"


def main(argv):
    del argv
    load = os.getloadavg()[0]
    if FLAGS.fit_rank is not None:
        row = bench_fit(FLAGS.fit_n, FLAGS.fit_d, FLAGS.fit_rank)
        row["load_average_start"], row["load_average_end"] = load, os.getloadavg()[0]
        print(row)
        if FLAGS.json_out:
            atomic_write_json(FLAGS.json_out, row)
        return
    configs = [(d, k) for d in SWEEP_D for k in SWEEP_K] if FLAGS.sweep else [(FLAGS.d, FLAGS.k)]
    print(f"bench_helix: {len(configs)} configs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {load:.2f} on {os.cpu_count()} cores", file=sys.stderr)
    progress = Progress("bench_helix configs", total=len(configs), unit="configs")
    rows = [run_config(d, k, progress) for d, k in configs]
    progress.close()
    meta = {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_start": load,
            "load_average_end": os.getloadavg()[0], "cpu_count": os.cpu_count(), "repeats": FLAGS.repeats}
    if FLAGS.json_out:
        atomic_write_json(FLAGS.json_out, {"meta": meta, "results": rows, **(rows[0] if len(rows) == 1 else {})})
    print(markdown(rows))


if __name__ == "__main__":
    app.run(main)
