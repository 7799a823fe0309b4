"""HELIX provider (party A): serves its linear head, and secure map fits on a public set, to authenticated clients.

    python -m experiments.helix_provider --flagfile=configs/helix_provider.flags

The head is a saved head directory (--head) or trained here on the provider's own model's embeddings of a labelled
task (--model, --task_data; --save_head keeps it). A secure fit needs the provider's embeddings of the public set:
--public_data (embedded with --model) or --public_features (an .npy array, rows in the public set's order).
Writes --port_file (JSON {"host", "port", "pid"}) once it accepts connections; SIGTERM/SIGINT end every session and stop.
"""
from __future__ import annotations

import signal
import sys
import threading

import numpy as np
from absl import app, flags

from linalign_jax.errors import LinalignError

FLAGS = flags.FLAGS
flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0 for every interface; use TLS off-host)")
flags.DEFINE_integer("port", 50051, "port to bind (0 = any free port, see --port_file)")
flags.DEFINE_string("port_file", "", "write {host, port, pid} here (atomically) once serving")
flags.DEFINE_string("token", "", "bearer token clients must present (prefer --token_file)")
flags.DEFINE_string("token_file", "", "file holding the bearer token")
flags.DEFINE_string("tls_cert", "", "PEM certificate chain; with --tls_key enables TLS")
flags.DEFINE_string("tls_key", "", "PEM private key for --tls_cert")
flags.DEFINE_string("head", "", "saved head directory to serve ('' = train one on --task_data)")
flags.DEFINE_string("save_head", "", "write the trained head here")
flags.DEFINE_string("model", "", "the provider's own model spec (trains the head, embeds the public set)")
flags.DEFINE_string("task_data", "", "labelled dataset spec the head is trained on")
flags.DEFINE_integer("train_limit", 0, "stratified subsample of the train split (0 = all)")
flags.DEFINE_integer("head_seed", 0, "PRNG seed of head training")
flags.DEFINE_bool("head_test_accuracy", False, "also embed the task's test split to log (and save) the head's accuracy")
flags.DEFINE_string("public_data", "", "public corpus spec for secure fits ('' = no fits unless --public_features)")
flags.DEFINE_integer("public_limit", 4096, "texts taken from the public corpus")
flags.DEFINE_string("public_features", "", ".npy [N, d] provider embeddings of the public set (instead of --model)")
flags.DEFINE_string("public_name", "", "name clients use for the public set (default: the spec or file name)")
flags.DEFINE_enum("pooling", "mean", ["mean", "last", "cls"], "pooling of the provider's model")
flags.DEFINE_bool("normalize", True, "L2-normalise pooled embeddings")
flags.DEFINE_integer("max_length", 128, "tokens per text")
flags.DEFINE_integer("batch_size", 64, "texts per extraction batch")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "model compute dtype")
flags.DEFINE_integer("data_seed", 0, "seed of the dataset split and the public-set shuffle")
flags.DEFINE_string("state_dir", "", "keeps head variants registered by secure fits across restarts")
flags.DEFINE_integer("max_sessions", 64, "live sessions at most")
flags.DEFINE_float("session_ttl_s", 3600.0, "a session ends this long after it opened")
flags.DEFINE_float("idle_timeout_s", 300.0, "a session ends after this long without a call")
flags.DEFINE_integer("max_message_mb", 256, "largest gRPC message accepted or sent (MiB)")
flags.DEFINE_integer("workers", 8, "RPC worker threads besides the one each session lease holds")
flags.DEFINE_string("preset", "auto", "CKKS preset every client must use ('auto' = smallest 128-bit ring per layout)")
flags.DEFINE_integer("fit_block", 4096, "public-set samples per fit ciphertext (at most the ring's slots)")


def _embed(texts: list[str]) -> np.ndarray:
    from experiments.helix_data import embed_with_flags

    return embed_with_flags(FLAGS, texts, "to train a head or embed the public set")


def load_or_train_head():
    from linalign_jax.helix.protocol import ServedHead
    from linalign_jax.serve.heads import load_head, save_head

    if FLAGS.head:
        return load_head(FLAGS.head)[0]
    if not FLAGS.task_data:
        raise LinalignError("give --head (a saved head) or --model and --task_data to train one")
    import jax

    from experiments.helix_data import subsample
    from linalign_jax.data import load_dataset
    from linalign_jax.evaluate.heads import accuracy, train_head

    task = load_dataset(FLAGS.task_data, seed=FLAGS.data_seed)
    labels = np.asarray(task["train"]["label"])
    keep = subsample(labels, FLAGS.train_limit, FLAGS.data_seed)
    x = _embed([task["train"]["text"][i] for i in keep])
    names = tuple(task["train"].features["label"].names)
    head = train_head(x, labels[keep], len(names), jax.random.PRNGKey(FLAGS.head_seed))
    test_acc = accuracy(head, _embed(list(task["test"]["text"])), np.asarray(task["test"]["label"])) \
        if FLAGS.head_test_accuracy else None
    print(f"helix provider: trained head on {len(keep)} rows of {FLAGS.task_data} (test accuracy {test_acc})",
          file=sys.stderr, flush=True)
    served = ServedHead(np.asarray(head.V), np.asarray(head.c), names)
    if FLAGS.save_head:
        save_head(FLAGS.save_head, served, {"model": FLAGS.model, "task_data": FLAGS.task_data,
                                            "train_rows": len(keep), "test_accuracy": test_acc,
                                            "pooling": FLAGS.pooling, "normalize": FLAGS.normalize,
                                            "max_length": FLAGS.max_length, "head_seed": FLAGS.head_seed})
    return served


def load_public():
    from linalign_jax.helix.protocol import PublicEmbeddings

    if FLAGS.public_features:
        try:
            Z = np.load(FLAGS.public_features, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise LinalignError(f"--public_features {FLAGS.public_features}: {e}") from None
        return PublicEmbeddings.from_array(FLAGS.public_name or FLAGS.public_features, Z)
    if FLAGS.public_data:
        from linalign_jax.data import load_texts

        texts = load_texts(FLAGS.public_data, limit=FLAGS.public_limit, seed=FLAGS.data_seed)
        name = FLAGS.public_name or f"{FLAGS.public_data}[:{len(texts)}]@seed{FLAGS.data_seed}"
        return PublicEmbeddings.from_array(name, _embed(texts))
    return None


def main(argv):
    del argv
    import os

    from linalign_jax.helix.protocol import ProviderCore
    from linalign_jax.io_utils import atomic_write_json
    from linalign_jax.serve.auth import load_token
    from linalign_jax.serve.heads import HeadStore
    from linalign_jax.serve.server import ProviderServer

    try:
        token = load_token(FLAGS.token, FLAGS.token_file)
        if bool(FLAGS.tls_cert) != bool(FLAGS.tls_key):
            raise LinalignError("TLS needs both --tls_cert and --tls_key")
        core = ProviderCore(load_or_train_head(), public=load_public(),
                            fitted_heads=HeadStore(os.path.join(FLAGS.state_dir, "heads") if FLAGS.state_dir
                                                   else None),
                            preset=None if FLAGS.preset == "auto" else FLAGS.preset, fit_block=FLAGS.fit_block)
        server = ProviderServer(core, token=token, host=FLAGS.host, port=FLAGS.port,
                                tls=(FLAGS.tls_cert, FLAGS.tls_key) if FLAGS.tls_cert else None,
                                max_sessions=FLAGS.max_sessions, session_ttl_s=FLAGS.session_ttl_s,
                                idle_timeout_s=FLAGS.idle_timeout_s,
                                max_message_bytes=FLAGS.max_message_mb << 20, workers=FLAGS.workers)
    except LinalignError as e:
        sys.exit(f"error: {e}")
    if not FLAGS.tls_cert and FLAGS.host not in ("127.0.0.1", "localhost", "::1"):
        print("helix provider: WARNING serving without TLS on a non-loopback address: the bearer token and "
              "ciphertexts travel in the clear", file=sys.stderr, flush=True)
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if FLAGS.port_file:
        atomic_write_json(FLAGS.port_file, {"host": FLAGS.host, "port": server.port, "pid": os.getpid()})
    d, k = core.head("base").dims
    print(f"helix provider: serving head [{d} -> {k}] on {FLAGS.host}:{server.port} "
          f"({'TLS' if FLAGS.tls_cert else 'plaintext transport'}; secure fit "
          f"{'on ' + core.public.name if core.public else 'off'})", file=sys.stderr, flush=True)
    stop.wait()
    print("helix provider: shutting down", file=sys.stderr, flush=True)
    server.stop()


if __name__ == "__main__":
    app.run(main)
