"""HELIX between two processes over loopback gRPC: query latency and the secure map fit (time, bytes, accuracy).

    python -m experiments.bench_helix_net --json_out=runs/bench_helix_net.json
    python -m experiments.bench_helix_net --query_shapes= --fit_dims=768x768 --fit_ranks=0,64   # fit only

Every number comes from a real provider process (`experiments.helix_provider`) on 127.0.0.1 and this process as the
client, on the production 128-bit presets. Query latency is end to end per query (encrypt → gRPC → provider eval →
gRPC → decrypt) with fresh session keys; bytes are the gRPC message payloads. The fit is measured on synthetic
embeddings of the requested dims (a noisy linear relation, so the map is well defined) and, with --task_data and two
models, on real ones, where the accuracy of each secure map with the provider's fitted head is compared with the
plaintext ridge map and the provider's base head. CPU seconds of both processes are reported next to wall time.

Served bulk (`--bulk_shapes`): one session, feature-major calls of up to `slots` queries; the target (issue 11) is
≤ 1 ms per query amortised at d=768, k=20 over loopback.

Targets (issue 6): query ≤ 60 ms at d=4096, k=20; full fit N=4096, 768 → 768 ≤ 5 min and ≤ 250 MB; rank 64 ≤ 15 s
and within 2 pp of the plaintext map.
"""
from __future__ import annotations

import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags

from linalign_jax import cli

FLAGS = flags.FLAGS
# The real-model fit accuracy (skipped without --task_data): models, data and extraction as in helix_demo.
cli.define_model_flags("source_model", "target_model",
                       defaults={"source_model": "all-MiniLM-L6-v2", "target_model": "all-mpnet-base-v2"})
cli.define_data_flags("task_data", "public_data", defaults={"public_limit": 4096})
cli.define_extraction_flags(model_conventions=False)
flags.DEFINE_list("query_shapes", ["4096x20", "768x20"], "head shapes d x k for the loopback query latency")
flags.DEFINE_integer("queries", 100, "queries per shape")
flags.DEFINE_list("bulk_shapes", ["768x20"], "head shapes d x k for served bulk (--bulk) over loopback")
flags.DEFINE_integer("bulk_queries", 4096, "queries per bulk measurement (one call per ring's slots)")
flags.DEFINE_integer("fit_n", 4096, "public-set samples of the synthetic fit")
flags.DEFINE_list("fit_dims", ["768x768"], "synthetic fit dims: client d_B x provider d_A")
flags.DEFINE_list("fit_ranks", ["64", "0"], "fit ranks to measure (0 = full rank)")
flags.DEFINE_integer("provider_omp_threads", 1, "OpenMP threads of the provider process (the issue's targets: 2 cores)")
flags.DEFINE_list("accuracy_ranks", ["16", "32", "64", "128", "0"], "ranks for accuracy vs r (real models)")
flags.DEFINE_string("work_dir", "", "scratch directory (default: a temporary one)")
flags.DEFINE_string("json_out", "", "write the results here")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Provider:
    def __init__(self, work: Path, token_file: Path, **flags_):
        from linalign_jax.serve.launch import launch_provider

        self.proc, self.target = launch_provider({"port": 0, "token_file": token_file, **flags_},
                                                 work / f"port-{secrets.token_hex(4)}.json",
                                                 omp_threads=FLAGS.provider_omp_threads)

    def cpu(self) -> float:
        return _cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def bench_bulk(work: Path, token_file: Path, d: int, k: int) -> dict:
    """Served bulk: `--bulk_queries` queries through one session, feature-major, amortised per query."""
    from linalign_jax.helix.encoding import input_bound
    from linalign_jax.helix.protocol import ServedHead
    from linalign_jax.serve.client import ProviderClient
    from linalign_jax.serve.heads import save_head
    from linalign_jax.serve.parties import classify_bulk

    rng = np.random.default_rng(d * 1000 + k + 1)
    head = ServedHead(rng.normal(size=(d, k)) / np.sqrt(d), rng.normal(size=k), tuple(map(str, range(k))))
    save_head(work / f"bulk_head_{d}x{k}", head)
    Z = rng.normal(size=(FLAGS.bulk_queries, d)) / np.sqrt(d)
    provider = Provider(work, token_file, head=work / f"bulk_head_{d}x{k}")
    try:
        with ProviderClient(provider.target, token=token_file.read_text(), timeout_s=3600) as client:
            cpu0, pcpu0, t0 = time.process_time(), provider.cpu(), time.perf_counter()
            run = classify_bulk(client, Z, k=k, input_bound=input_bound(Z),
                                timeout_s=3600)
            wall, cpu, pcpu = time.perf_counter() - t0, time.process_time() - cpu0, provider.cpu() - pcpu0
    finally:
        provider.stop()
    err = float(np.abs(run.logits - (Z @ head.V + head.c)).max())
    n = len(Z)
    return {"d": d, "k": k, "queries": n, "wall_s": wall, "ms_per_query": wall / n * 1e3,
            "ms_per_query_excluding_setup": (wall - run.setup_s) / n * 1e3, "setup_s": run.setup_s,
            "client_cpu_ms_per_query": cpu / n * 1e3, "provider_cpu_ms_per_query": pcpu / n * 1e3,
            "bytes_per_query": float((run.bytes_up + run.bytes_down).mean()), "max_abs_logit_error": err}


def bench_queries(work: Path, token_file: Path, d: int, k: int) -> dict:
    from linalign_jax.helix.encoding import input_bound
    from linalign_jax.helix.protocol import ServedHead
    from linalign_jax.serve.client import ProviderClient
    from linalign_jax.serve.heads import save_head
    from linalign_jax.serve.parties import classify

    rng = np.random.default_rng(d * 1000 + k)
    head = ServedHead(rng.normal(size=(d, k)) / np.sqrt(d), rng.normal(size=k), tuple(map(str, range(k))))
    save_head(work / f"head_{d}x{k}", head)
    Z = rng.normal(size=(FLAGS.queries, d)) / np.sqrt(d)
    provider = Provider(work, token_file, head=work / f"head_{d}x{k}")
    try:
        with ProviderClient(provider.target, token=token_file.read_text()) as client:
            cpu0, pcpu0 = time.process_time(), provider.cpu()
            run = classify(client, Z, k=k, input_bound=input_bound(Z),
                           progress=f"queries d={d} k={k}")
            cpu, pcpu = time.process_time() - cpu0, provider.cpu() - pcpu0
    finally:
        provider.stop()
    err = float(np.abs(run.logits - (Z @ head.V + head.c)).max())
    return {"d": d, "k": k, **run.summary(), "client_cpu_s_per_query": cpu / len(Z),
            "provider_cpu_s_per_query": pcpu / len(Z), "max_abs_logit_error": err}


def bench_fit(work: Path, token_file: Path, Z_B: np.ndarray, Z_A: np.ndarray, ranks: list[int], name: str,
              head=None) -> tuple[list[dict], dict]:
    """Secure fits at each rank against one provider holding Z_A; returns (records, {rank: (map, head name)})."""
    from linalign_jax.helix.protocol import ServedHead
    from linalign_jax.serve.client import ProviderClient
    from linalign_jax.serve.heads import save_head
    from linalign_jax.serve.parties import secure_fit

    if head is None:
        rng = np.random.default_rng(1)
        head = ServedHead(rng.normal(size=(Z_A.shape[1], 2)), np.zeros(2), ("0", "1"))
    save_head(work / f"head_{name}", head)
    np.save(work / f"public_{name}.npy", Z_A)
    provider = Provider(work, token_file, head=work / f"head_{name}", public_features=work / f"public_{name}.npy",
                        public_name=name, state_dir=work / f"state_{name}")
    records, maps = [], {}
    try:
        with ProviderClient(provider.target, token=token_file.read_text()) as client:
            for rank in ranks:
                cpu0, pcpu0 = time.process_time(), provider.cpu()
                run = secure_fit(client, Z_B, rank=rank)
                cpu, pcpu = time.process_time() - cpu0, provider.cpu() - pcpu0
                info = run.info
                records.append({"set": name, "n": len(Z_B), "d_B": Z_B.shape[1], "d_A": Z_A.shape[1], "rank": rank,
                                "fit_s": info["fit_seconds"], "client_cpu_s": cpu, "provider_cpu_s": pcpu,
                                "bytes_total": info["bytes_total"], "key_bytes": info["key_bundle_bytes"],
                                "bytes_up": info["bytes_up"], "bytes_down": info["bytes_down"],
                                "lambda": info["lambda"], "layout": info["layout"]})
                maps[rank] = (run.affine, info["helix_head"])
                print(f"fit {name} rank {rank or 'full'}: {info['fit_seconds']:.1f} s, "
                      f"{info['bytes_total'] / 1e6:.1f} MB", file=sys.stderr, flush=True)
    finally:
        provider.stop()
    return records, maps


def synthetic_pair(n: int, d_b: int, d_a: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-scale embeddings with a noisy linear relation, like normalized sentence embeddings."""
    rng = np.random.default_rng(n + d_b + d_a)
    Z_B = rng.normal(size=(n, d_b)) / np.sqrt(d_b) + 0.02
    Z_A = Z_B @ (rng.normal(size=(d_b, d_a)) / np.sqrt(d_b)) + 0.3 * rng.normal(size=(n, d_a)) / np.sqrt(d_a)
    return Z_B, Z_A


def real_fit_accuracy(work: Path, token_file: Path) -> list[dict]:
    """Accuracy vs rank of secure maps (client source model → provider's head) against the plaintext ridge map."""
    import jax

    from linalign_jax.embedders import embed_texts as embed
    from linalign_jax.align import fit_ridge
    from linalign_jax.data.task import load_task_texts
    from linalign_jax.evaluate.heads import train_head
    from linalign_jax.helix.protocol import ServedHead
    from linalign_jax.serve.heads import HeadStore

    options = cli.extraction_options()
    data = load_task_texts(FLAGS.task_data, public_data=FLAGS.public_data, train_limit=FLAGS.train_limit,
                           test_limit=FLAGS.test_limit, public_limit=FLAGS.public_limit, seed=FLAGS.data_seed,
                           text_column=FLAGS.text_column, label_column=FLAGS.label_column)
    a_train, a_public = (embed(FLAGS.target_model, t, options, FLAGS.dtype)
                         for t in (data["train"][0], data["public"]))
    b_test, b_public = (embed(FLAGS.source_model, t, options, FLAGS.dtype) for t in (data["test"][0], data["public"]))
    (_, labels), (_, y_test) = data["train"], data["test"]
    trained = train_head(a_train, labels, int(labels.max()) + 1, jax.random.PRNGKey(0))
    head = ServedHead(np.asarray(trained.V), np.asarray(trained.c), tuple(map(str, range(trained.V.shape[1]))))
    plain_map, _ = fit_ridge(b_public, a_public)
    plain_acc = float(np.mean(((b_test @ plain_map.W + plain_map.b) @ head.V + head.c).argmax(1) == y_test))
    ranks = [int(r) for r in FLAGS.accuracy_ranks]
    records, maps = bench_fit(work, token_file, b_public, a_public, ranks, "real", head)
    heads = HeadStore(work / "state_real" / "heads")
    for record, rank in zip(records, ranks):
        affine, head_name = maps[rank]
        fitted = heads[head_name]
        acc = float(np.mean(((b_test @ affine.W + affine.b) @ fitted.V + fitted.c).argmax(1) == y_test))
        record.update(accuracy=acc, plaintext_map_accuracy=plain_acc, accuracy_gap_pp=100 * (plain_acc - acc),
                      task=FLAGS.task_data, models=f"{FLAGS.source_model} -> {FLAGS.target_model}")
    return records


def markdown(results: dict) -> str:
    lines = ["| query shape | p50 ms | p99 ms | bytes/query (up+down) | keys MB | client CPU ms/q | provider CPU ms/q |",
             "|---|---|---|---|---|---|---|"]
    for q in results["queries"]:
        lines.append(f"| d={q['d']} k={q['k']} | {q['latency_ms_p50']:.1f} | {q['latency_ms_p99']:.1f} | "
                     f"{q['bytes_per_query']:,.0f} | {q['session_setup_bytes'] / 1e6:.1f} | "
                     f"{q['client_cpu_s_per_query'] * 1e3:.1f} | {q['provider_cpu_s_per_query'] * 1e3:.1f} |")
    if results["bulk"]:
        lines += ["", "| bulk shape | queries | ms/query (wall, all in) | ms/query (after setup) | client CPU ms/q | "
                      "provider CPU ms/q | bytes/query |", "|---|---|---|---|---|---|---|"]
    for b in results["bulk"]:
        lines.append(f"| d={b['d']} k={b['k']} | {b['queries']} | {b['ms_per_query']:.2f} | "
                     f"{b['ms_per_query_excluding_setup']:.2f} | {b['client_cpu_ms_per_query']:.2f} | "
                     f"{b['provider_cpu_ms_per_query']:.2f} | {b['bytes_per_query']:,.0f} |")
    lines += ["", "| fit | N | d_B→d_A | rank | wall s | client CPU s | provider CPU s | MB total (keys/up/down) | "
                  "accuracy (plaintext map) |", "|---|---|---|---|---|---|---|---|---|"]
    for f in results["fits"]:
        acc = f"{f['accuracy']:.4f} ({f['plaintext_map_accuracy']:.4f})" if "accuracy" in f else "—"
        lines.append(f"| {f['set']} | {f['n']} | {f['d_B']}→{f['d_A']} | {f['rank'] or 'full'} | {f['fit_s']:.1f} | "
                     f"{f['client_cpu_s']:.1f} | {f['provider_cpu_s']:.1f} | {f['bytes_total'] / 1e6:.1f} "
                     f"({f['key_bytes'] / 1e6:.1f}/{f['bytes_up'] / 1e6:.1f}/{f['bytes_down'] / 1e6:.1f}) | {acc} |")
    return "\n".join(lines)


def main(argv):
    del argv
    from linalign_jax.io_utils import atomic_write_json

    work = Path(FLAGS.work_dir or tempfile.mkdtemp(prefix="bench_helix_net_"))
    work.mkdir(parents=True, exist_ok=True)
    token_file = work / "token"
    token_file.write_text(secrets.token_hex(32))
    results = {"command": " ".join(sys.argv), "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                                                          "client_omp_threads": os.environ.get("OMP_NUM_THREADS"),
                                                          "provider_omp_threads": FLAGS.provider_omp_threads},
               "queries": [], "bulk": [], "fits": []}
    for shape in FLAGS.query_shapes:
        d, k = (int(v) for v in shape.split("x"))
        results["queries"].append(bench_queries(work, token_file, d, k))
    for shape in FLAGS.bulk_shapes:
        d, k = (int(v) for v in shape.split("x"))
        results["bulk"].append(bench_bulk(work, token_file, d, k))
    for dims in FLAGS.fit_dims:
        d_b, d_a = (int(v) for v in dims.split("x"))
        records, _ = bench_fit(work, token_file, *synthetic_pair(FLAGS.fit_n, d_b, d_a),
                               [int(r) for r in FLAGS.fit_ranks], f"synthetic{d_b}x{d_a}")
        results["fits"] += records
    if FLAGS.task_data:
        results["fits"] += real_fit_accuracy(work, token_file)
    results["machine"]["load_avg_end"] = os.getloadavg()
    if FLAGS.json_out:
        atomic_write_json(FLAGS.json_out, results)
    print(markdown(results))


if __name__ == "__main__":
    cli.run(main)
