"""HELIX client (party B): classify through a remote provider's encrypted head, or fit a map with it securely.

    python -m experiments.helix_client --flagfile=configs/helix_client.flags                 # --mode=classify
    python -m experiments.helix_client --mode=fit --provider=HOST:PORT --token_file=... \
        --model=all-MiniLM-L6-v2 --public_data=public --public_limit=4096 --rank=64 --map_out=maps/secure

classify: embeds --task_data's test split with its own --model (or reads --features/--labels .npy), maps it locally
with --map, encrypts each query under fresh session keys, and writes --out (JSON): a summary (accuracy, latency p50/p99,
bytes per query) and one record per query (label, prediction, latency_ms, bytes_up, bytes_down).
fit: runs the secure map fit (paper §3.2) on the public set and saves the map to --map_out only once it is complete.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from absl import app, flags

from linalign_jax.errors import LinalignError

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "classify", ["classify", "fit"], "what to do with the provider")
flags.DEFINE_string("provider", "127.0.0.1:50051", "provider host:port")
flags.DEFINE_string("provider_file", "", "read host/port from the provider's --port_file instead")
flags.DEFINE_string("token", "", "bearer token (prefer --token_file)")
flags.DEFINE_string("token_file", "", "file holding the bearer token")
flags.DEFINE_string("tls_ca", "", "PEM CA (or the provider's self-signed certificate): enables TLS")
flags.DEFINE_string("tls_server_name", "", "expected name in the provider's certificate, if not the host")
flags.DEFINE_float("timeout_s", 60.0, "deadline of each query (a fit gets --fit_timeout_s)")
flags.DEFINE_float("fit_timeout_s", 3600.0, "deadline of the whole secure fit")
flags.DEFINE_string("model", "", "the client's own model spec")
flags.DEFINE_string("map", "", "saved map directory (classify)")
flags.DEFINE_string("task_data", "", "labelled dataset spec whose test split is classified")
flags.DEFINE_integer("test_limit", 0, "stratified subsample of the test split (0 = all)")
flags.DEFINE_string("features", "", ".npy client embeddings to classify (instead of --model/--task_data)")
flags.DEFINE_string("labels", "", ".npy labels for --features")
flags.DEFINE_float("input_bound", 0.0, "public bound on |mapped embedding| entries (0 = next power of two of the data)")
flags.DEFINE_string("out", "", "classify: predictions JSON")
flags.DEFINE_string("public_data", "public", "fit: public corpus spec (same texts, same order as the provider's)")
flags.DEFINE_integer("public_limit", 4096, "fit: texts taken from the public corpus")
flags.DEFINE_string("public_features", "", "fit: .npy client embeddings of the public set (instead of --model)")
flags.DEFINE_integer("rank", 0, "fit: 0 = full-rank map, r = both sides reduce to their own top-r PCA basis")
flags.DEFINE_string("ridge_lambda", "auto", "fit: ridge λ or 'auto' (GCV)")
flags.DEFINE_integer("batch_columns", 8, "fit: column ciphertexts per message")
flags.DEFINE_string("map_out", "", "fit: where the map is saved (atomically, only after a complete fit)")
flags.DEFINE_enum("pooling", "mean", ["mean", "last", "cls"], "pooling of the client's model")
flags.DEFINE_bool("normalize", True, "L2-normalise pooled embeddings")
flags.DEFINE_integer("max_length", 128, "tokens per text")
flags.DEFINE_integer("batch_size", 64, "texts per extraction batch")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "model compute dtype")
flags.DEFINE_integer("data_seed", 0, "seed of the dataset split and the public-set shuffle (match the provider)")


def _embed(texts: list[str]) -> np.ndarray:
    from experiments.helix_data import embed_with_flags

    return embed_with_flags(FLAGS, texts, "unless embeddings are given as .npy files")


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LinalignError(f"{what} {path}: {e}") from None


def connect():
    from linalign_jax.serve.auth import load_token
    from linalign_jax.serve.client import ProviderClient

    target = FLAGS.provider
    if FLAGS.provider_file:
        with open(FLAGS.provider_file) as f:
            where = json.load(f)
        target = f"{where['host']}:{where['port']}"
    return ProviderClient(target, token=load_token(FLAGS.token, FLAGS.token_file), tls_ca=FLAGS.tls_ca or None,
                          tls_server_name=FLAGS.tls_server_name or None, timeout_s=FLAGS.timeout_s)


def task_embeddings() -> tuple[np.ndarray, np.ndarray]:
    if FLAGS.features:
        Z = _load_npy(FLAGS.features, "--features")
        labels = _load_npy(FLAGS.labels, "--labels") if FLAGS.labels else np.full(len(Z), -1)
        return Z, labels
    if not FLAGS.task_data:
        raise LinalignError("give --task_data (with --model) or --features")
    from experiments.helix_data import subsample
    from linalign_jax.data import load_dataset

    test = load_dataset(FLAGS.task_data, seed=FLAGS.data_seed)["test"]
    labels = np.asarray(test["label"])
    keep = subsample(labels, FLAGS.test_limit, FLAGS.data_seed)
    return _embed([test["text"][i] for i in keep]), labels[keep]


def classify() -> dict:
    from linalign_jax.align import apply_map, load_map
    from linalign_jax.io_utils import atomic_write_json
    from linalign_jax.serve.parties import classify as run_queries

    if not FLAGS.map:
        raise LinalignError("--map (a saved map directory) is required to classify")
    affine, meta = load_map(FLAGS.map)
    Z, labels = task_embeddings()
    mapped = apply_map(affine, np.asarray(Z, np.float32)).astype(np.float64)
    bound = FLAGS.input_bound or 2.0 ** np.ceil(np.log2(max(np.abs(mapped).max(), 1e-12)))
    with connect() as client:
        info = client.info()
        head = meta.get("helix_head", "base")
        if head == "base" and mapped.shape[1] != info["head"]["d"]:
            raise LinalignError(f"map {FLAGS.map} outputs dim {mapped.shape[1]}, the provider's head takes "
                                f"{info['head']['d']}")
        run = run_queries(client, mapped, head=head, k=info["head"]["k"], input_bound=bound,
                          preset=info.get("preset"), timeout_s=FLAGS.timeout_s)
    predictions = run.logits.argmax(1)
    summary = {**run.summary(), "provider": client.target, "head": head, "input_bound": bound,
               "accuracy": float(np.mean(predictions == labels)) if (labels >= 0).all() else None}
    records = [{"i": i, "label": int(labels[i]), "prediction": int(predictions[i]),
                "latency_ms": float(run.latency_s[i] * 1e3), "bytes_up": int(run.bytes_up[i]),
                "bytes_down": int(run.bytes_down[i])} for i in range(len(predictions))]
    if FLAGS.out:
        atomic_write_json(FLAGS.out, {"command": " ".join(sys.argv), "summary": summary, "labels": info["head"]["labels"],
                                      "predictions": records, "logits": run.logits})
    acc = "n/a" if summary["accuracy"] is None else f"{summary['accuracy']:.4f}"
    print(f"| queries | accuracy | p50 ms | p99 ms | bytes/query (up + down) | session setup |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {summary['queries']} | {acc} | {summary['latency_ms_p50']:.1f} | {summary['latency_ms_p99']:.1f} | "
          f"{summary['bytes_per_query']:,.0f} ({summary['bytes_up_per_query']:,.0f} + "
          f"{summary['bytes_down_per_query']:,.0f}) | {summary['session_setup_bytes'] / 1e6:.1f} MB, "
          f"{summary['session_setup_s']:.2f} s |")
    return summary


def fit() -> dict:
    from linalign_jax.align import save_map
    from linalign_jax.align.ridge import parse_lambda
    from linalign_jax.serve.parties import secure_fit

    if not FLAGS.map_out:
        raise LinalignError("--map_out is required for --mode=fit")
    lam = parse_lambda(FLAGS.ridge_lambda)
    if FLAGS.public_features:
        Z_B = _load_npy(FLAGS.public_features, "--public_features")
    else:
        from linalign_jax.data import load_texts

        Z_B = _embed(load_texts(FLAGS.public_data, limit=FLAGS.public_limit, seed=FLAGS.data_seed))
    start = time.perf_counter()
    with connect() as client:
        run = secure_fit(client, Z_B, rank=FLAGS.rank, lam=lam, batch_columns=FLAGS.batch_columns,
                         timeout_s=FLAGS.fit_timeout_s)
    save_map(FLAGS.map_out, run.affine, {**run.info, "source_model": FLAGS.model or FLAGS.public_features,
                                         "provider": client.target, "command": " ".join(sys.argv)})
    print(f"secure fit: map [{run.affine.source_dim} -> {run.affine.target_dim}] (rank {FLAGS.rank or 'full'}, "
          f"λ={run.info['lambda']:.3g}) saved to {FLAGS.map_out} in {time.perf_counter() - start:.1f} s, "
          f"{run.info['bytes_total'] / 1e6:.1f} MB exchanged (keys {run.info['key_bundle_bytes'] / 1e6:.1f} MB, "
          f"up {run.info['bytes_up'] / 1e6:.1f} MB, down {run.info['bytes_down'] / 1e6:.1f} MB)")
    return run.info


def main(argv):
    del argv
    try:
        classify() if FLAGS.mode == "classify" else fit()
    except (LinalignError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
