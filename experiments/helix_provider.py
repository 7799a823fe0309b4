"""HELIX provider (party A): serves its linear head, and secure map fits on a public set, to authenticated clients.

    python -m experiments.helix_provider --flagfile=configs/helix_provider.flags

The head is a saved head directory (--head) or trained here on the provider's own model's embeddings of a labelled
task (--model, --task_data; --save_head keeps it). A secure fit needs the provider's embeddings of the public set:
--public_data (embedded with --model) or --public_features (an .npy array, rows in the public set's order).
Every flag, file and the port are checked first (seconds), the model is loaded once and the head trained after (minutes).
Writes --port_file (JSON {"host", "port", "pid"}) once it accepts connections; SIGTERM/SIGINT end every session and stop.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading

import numpy as np
from absl import flags

from linalign_jax import cli
from linalign_jax.errors import LinalignError

FLAGS = flags.FLAGS
cli.define_helix_provider_flags()
cli.define_model_flags("model")
cli.define_data_flags("task_data", "public_data", defaults={"public_data": "", "public_limit": 4096})
cli.define_extraction_flags(model_conventions=False)
flags.DEFINE_string("head", "", "saved head directory to serve ('' = train one on --task_data)")
flags.DEFINE_string("save_head", "", "write the trained head here")
flags.DEFINE_integer("head_seed", 0, "PRNG seed of head training")
flags.DEFINE_bool("head_test_accuracy", False, "also embed the task's test split to log (and save) the head's accuracy")
flags.DEFINE_string("public_features", "", ".npy [N, d] provider embeddings of the public set (instead of --model)")
flags.DEFINE_string("public_name", "", "name clients use for the public set (default: the spec or file name)")
flags.DEFINE_string("state_dir", "", "keeps head variants registered by secure fits across restarts")
flags.DEFINE_integer("max_sessions", 64, "live sessions at most")
flags.DEFINE_integer("max_fitted_heads", 256, "head variants registered by secure fits kept at most (oldest go first)")
flags.DEFINE_float("fitted_head_ttl_s", 30 * 86400.0, "a fitted head variant is deleted this long after its fit")
flags.DEFINE_integer("max_sessions_per_client", 16, "live sessions per client address at most")
flags.DEFINE_integer("max_queries_per_session", 0,
                     "queries a session may make (0 = unlimited; full logits allow extracting a d-dim head with ~d)")
flags.DEFINE_float("session_ttl_s", 3600.0, "a session ends this long after it opened")
flags.DEFINE_float("idle_timeout_s", 300.0, "a session ends after this long without a call")
flags.DEFINE_float("call_timeout_s", 300.0, "server-side deadline of one unary call (a fit: the session TTL)")
flags.DEFINE_integer("max_message_mb", 0, "largest gRPC message accepted or sent (MiB; 0 = the largest real request)")
flags.DEFINE_integer("workers", 8, "RPC worker threads besides the one each session lease holds")
flags.DEFINE_string("preset", "auto", "CKKS preset every client must use ('auto' = smallest 128-bit ring per layout)")
flags.DEFINE_integer("sandbox_memory_mb", 4096,
                     "address-space limit of the worker that parses client key material first (0 = no worker)")
flags.DEFINE_integer("fit_block", 4096, "public-set samples per fit ciphertext (at most the ring's slots)")


def _embed(texts: list[str]) -> np.ndarray:
    return cli.embed_with_flags(texts, "to train a head or embed the public set")


def check_flags() -> str:
    """Everything that can be checked in seconds, before any model is loaded; returns the token."""
    from linalign_jax.helix import PRESETS
    from linalign_jax.serve.auth import server_credentials
    from linalign_jax.serve.server import is_loopback

    token = cli.helix_token()
    if bool(FLAGS.tls_cert) != bool(FLAGS.tls_key):
        raise LinalignError("TLS needs both --tls_cert and --tls_key")
    if FLAGS.tls_cert:
        server_credentials(FLAGS.tls_cert, FLAGS.tls_key)  # both files exist and are PEM
    elif not is_loopback(FLAGS.host) and not FLAGS.allow_plaintext:
        raise LinalignError(f"--host={FLAGS.host} without TLS would send the bearer token and ciphertexts in the "
                            f"clear: give --tls_cert and --tls_key, or --allow_plaintext on a trusted network")
    if FLAGS.preset != "auto":
        if FLAGS.preset not in PRESETS:
            raise LinalignError(f"--preset={FLAGS.preset} is not one of {['auto', *PRESETS]}")
        if not PRESETS[FLAGS.preset].secure and not FLAGS.allow_insecure_preset_for_tests:
            raise LinalignError(f"--preset={FLAGS.preset} is below 128-bit security: tests only "
                                f"(--allow_insecure_preset_for_tests)")
    if not FLAGS.head and not (FLAGS.model and FLAGS.task_data):
        raise LinalignError("give --head (a saved head) or --model and --task_data to train one")
    for flag in ("head", "public_features"):
        if getattr(FLAGS, flag) and not os.path.exists(getattr(FLAGS, flag)):
            raise LinalignError(f"--{flag}={getattr(FLAGS, flag)} does not exist")
    if FLAGS.public_data and not FLAGS.public_features and not FLAGS.model:
        raise LinalignError("--public_data needs --model to embed it (or give --public_features)")
    if FLAGS.public_limit < 1 or FLAGS.train_limit < 0:
        raise LinalignError(f"--public_limit must be >= 1 and --train_limit >= 0, got {FLAGS.public_limit}, "
                            f"{FLAGS.train_limit}")
    check_bindable(FLAGS.host, FLAGS.port)
    return token


def check_bindable(host: str, port: int) -> None:
    """Fail in a second, not after minutes of loading, when the address cannot be served."""
    if port == 0:
        return
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise LinalignError(f"{host}:{port} {why}: stop the other server or choose another --port") from None


def load_or_train_head():
    from linalign_jax.data import load_dataset
    from linalign_jax.serve.heads import load_head, save_head, train_task_head

    if FLAGS.head:
        return load_head(FLAGS.head)[0]
    task = load_dataset(FLAGS.task_data, seed=FLAGS.data_seed, text_column=FLAGS.text_column,
                        label_column=FLAGS.label_column)
    served, trained = train_task_head(_embed, task, train_limit=FLAGS.train_limit, test_limit=FLAGS.test_limit,
                                      data_seed=FLAGS.data_seed, head_seed=FLAGS.head_seed,
                                      test_accuracy=FLAGS.head_test_accuracy)
    score = trained["test_accuracy"]
    where = "" if score is None else f"; test accuracy {score:.4f}"
    print(f"helix provider: trained head on {trained['train_rows']} rows of {FLAGS.task_data}{where}",
          file=sys.stderr, flush=True)
    if FLAGS.save_head:
        save_head(FLAGS.save_head, served, {"model": FLAGS.model, "task_data": FLAGS.task_data, **trained,
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

        texts = load_texts(FLAGS.public_data, limit=FLAGS.public_limit, seed=FLAGS.data_seed,
                           text_column=FLAGS.text_column)
        name = FLAGS.public_name or f"{FLAGS.public_data}[:{len(texts)}]@seed{FLAGS.data_seed}"
        return PublicEmbeddings.from_array(name, _embed(texts))
    return None


def public_facts() -> dict:
    """What a client must match before it embeds anything (issue 16): the public set and the provider's features."""
    facts = {"model": FLAGS.model or None, "pooling": FLAGS.pooling, "normalize": FLAGS.normalize,
             "max_length": FLAGS.max_length}
    if FLAGS.public_data and not FLAGS.public_features:
        facts["public_data"] = {"spec": FLAGS.public_data, "limit": FLAGS.public_limit, "seed": FLAGS.data_seed}
    return facts


def main(argv):
    del argv
    from linalign_jax.helix import validate
    from linalign_jax.helix.protocol import ProviderCore
    from linalign_jax.helix.sandbox import Sandbox
    from linalign_jax.io_utils import atomic_write_json
    from linalign_jax.serve.heads import HeadStore
    from linalign_jax.serve.server import ProviderServer

    token = check_flags()
    if FLAGS.sandbox_memory_mb:
        validate.use_sandbox(Sandbox(memory_mb=FLAGS.sandbox_memory_mb))
    core = ProviderCore(load_or_train_head(), public=load_public(),
                        fitted_heads=HeadStore(os.path.join(FLAGS.state_dir, "heads") if FLAGS.state_dir
                                               else None, max_heads=FLAGS.max_fitted_heads,
                                               ttl_s=FLAGS.fitted_head_ttl_s),
                        preset=None if FLAGS.preset == "auto" else FLAGS.preset, fit_block=FLAGS.fit_block)
    server = ProviderServer(core, token=token, host=FLAGS.host, port=FLAGS.port,
                            tls=(FLAGS.tls_cert, FLAGS.tls_key) if FLAGS.tls_cert else None,
                            allow_plaintext=FLAGS.allow_plaintext, max_sessions=FLAGS.max_sessions,
                            max_sessions_per_client=FLAGS.max_sessions_per_client,
                            max_queries_per_session=FLAGS.max_queries_per_session,
                            session_ttl_s=FLAGS.session_ttl_s, idle_timeout_s=FLAGS.idle_timeout_s,
                            call_timeout_s=FLAGS.call_timeout_s,
                            max_message_bytes=FLAGS.max_message_mb << 20 if FLAGS.max_message_mb else None,
                            workers=FLAGS.workers, facts=public_facts(),
                            allow_insecure_preset_for_tests=FLAGS.allow_insecure_preset_for_tests)
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if FLAGS.port_file:
        atomic_write_json(FLAGS.port_file, {"host": FLAGS.host, "port": server.port, "pid": os.getpid()})
    d, k = core.head("base").dims
    print(f"helix provider: serving head [{d} -> {k}] on {FLAGS.host}:{server.port} "
          f"({'TLS' if FLAGS.tls_cert else 'plaintext transport'}; messages up to "
          f"{server.max_message_bytes / 2**20:.1f} MiB; secure fit "
          f"{'on ' + core.public.name if core.public else 'off'})", file=sys.stderr, flush=True)
    stop.wait()
    print("helix provider: shutting down", file=sys.stderr, flush=True)
    server.stop()


if __name__ == "__main__":
    cli.run(main)
