"""HELIX end to end on one machine: a provider process on localhost, this process as the client.

    python -m experiments.helix_demo --flagfile=configs/helix_demo.flags

1. starts `experiments.helix_provider` (party A: trains its head on its own model's embeddings of the task, embeds
   the public set) on a free localhost port with a fresh bearer token;
2. the client (party B) gets its map: --map (e.g. one saved by `experiments.align`) or, by default, a secure fit
   over the connection (paper §3.2; --fit_rank 0 = full rank);
3. classifies the task's test split through the provider, one encrypted query per call;
4. checks the result against the plaintext pipeline (same map, same head, no encryption): the predictions must be
   identical. Prints accuracy, p50/p99 latency and bytes per query; writes --out_dir/helix_demo.json.
"""
from __future__ import annotations

import secrets
import signal
import subprocess
from pathlib import Path

import numpy as np
from absl import flags

from linalign_jax import cli
from linalign_jax.errors import LinalignError

FLAGS = flags.FLAGS
cli.define_model_flags("source_model", "target_model",
                       defaults={"source_model": "all-MiniLM-L6-v2", "target_model": "all-mpnet-base-v2"})
cli.define_data_flags("task_data", "public_data", defaults={"task_data": "trec", "public_limit": 4096})
cli.define_extraction_flags(model_conventions=False)
flags.DEFINE_string("map", "", "saved map directory ('' = fit one securely with the provider)")
flags.DEFINE_integer("fit_rank", 0, "secure fit: 0 = full rank, r = rank-r on both sides")
cli.define_ridge_flag()  # the secure fit
flags.DEFINE_string("out_dir", "runs/helix_demo", "output directory")
flags.DEFINE_float("provider_start_timeout_s", 3600.0, "wait this long for the provider (head training, embedding)")


def start_provider(out_dir: Path, token_file: Path) -> tuple[subprocess.Popen, str]:
    from linalign_jax.serve.launch import launch_provider

    extraction = {name: FLAGS[name].value for name in ("pooling", "normalize", "max_length", "batch_size", "layer",
                                                       "instruction", "feature_cache", "dtype", "data_seed",
                                                       "text_column", "label_column")}
    return launch_provider({"model": FLAGS.target_model, "task_data": FLAGS.task_data,
                            "train_limit": FLAGS.train_limit, "test_limit": FLAGS.test_limit,
                            "save_head": out_dir / "provider_head", "public_data": FLAGS.public_data,
                            "public_limit": FLAGS.public_limit, "state_dir": out_dir / "provider_state",
                            "port": 0, "token_file": token_file,
                            **{k: v for k, v in extraction.items() if v is not None}},
                           out_dir / "provider_port.json", timeout_s=FLAGS.provider_start_timeout_s)


def run(out_dir: Path) -> dict:
    from linalign_jax.align import apply_map, load_map, save_map
    from linalign_jax.align.ridge import parse_lambda
    from linalign_jax.data import load_dataset, load_texts
    from linalign_jax.data.splits import stratified_subsample
    from linalign_jax.embedders import embed_texts as embed
    from linalign_jax.helix.encoding import input_bound
    from linalign_jax.io_utils import atomic_write_json
    from linalign_jax.serve.client import ProviderClient
    from linalign_jax.serve.heads import HeadStore, load_head
    from linalign_jax.serve.parties import classify, secure_fit

    options = cli.extraction_options()
    test = load_dataset(FLAGS.task_data, seed=FLAGS.data_seed, text_column=FLAGS.text_column,
                        label_column=FLAGS.label_column)["test"]
    labels = np.asarray(test["label"])
    keep = stratified_subsample(labels, FLAGS.test_limit, FLAGS.data_seed)
    labels = labels[keep]
    sets = {"test": [test["text"][i] for i in keep]}
    if not FLAGS.map:
        sets["public"] = load_texts(FLAGS.public_data, limit=FLAGS.public_limit, seed=FLAGS.data_seed,
                                    text_column=FLAGS.text_column)
    client_feats = {name: embed(FLAGS.source_model, texts, options, FLAGS.dtype) for name, texts in sets.items()}

    token_file = out_dir / "token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    provider, target = start_provider(out_dir, token_file)
    try:
        with ProviderClient(target, token=token_file.read_text()) as client:
            info = client.info()
            fit_info = None
            if FLAGS.map:
                affine, meta = load_map(FLAGS.map)
                head_name = meta.get("helix_head", "base")
            else:
                lam = parse_lambda(FLAGS.ridge_lambda)
                fit = secure_fit(client, client_feats["public"], rank=FLAGS.fit_rank, lam=lam)
                affine, fit_info, head_name = fit.affine, fit.info, fit.info["helix_head"]
                save_map(out_dir / "secure_map", affine, {**fit_info, "source_model": FLAGS.source_model})
            mapped = apply_map(affine, client_feats["test"]).astype(np.float64)
            bound = input_bound(mapped)
            queries = classify(client, mapped, head=head_name, k=info["head"]["k"], input_bound=bound,
                               preset=info.get("preset"))
    finally:
        provider.send_signal(signal.SIGTERM)
        provider.wait(timeout=60)

    # The plaintext pipeline: the same map and the same head (read from the provider's files), no encryption.
    head = load_head(out_dir / "provider_head")[0] if head_name == "base" else \
        HeadStore(out_dir / "provider_state" / "heads")[head_name]
    plain_logits = mapped @ head.V + head.c
    helix_pred, plain_pred = queries.logits.argmax(1), plain_logits.argmax(1)
    summary = queries.summary()
    result = {"command": cli.command_line(), "source_model": FLAGS.source_model, "target_model": FLAGS.target_model,
              "task_data": FLAGS.task_data, "test_rows": int(len(labels)), "map": FLAGS.map or "secure fit",
              "helix_accuracy": float(np.mean(helix_pred == labels)),
              "plaintext_accuracy": float(np.mean(plain_pred == labels)),
              "prediction_agreement": float(np.mean(helix_pred == plain_pred)),
              "max_abs_logit_error": float(np.abs(queries.logits - plain_logits).max()),
              "queries": summary, "secure_fit": fit_info}
    atomic_write_json(out_dir / "helix_demo.json", result)
    fit_row = "" if fit_info is None else (
        f"| secure fit (rank {FLAGS.fit_rank or 'full'}) | {fit_info['fit_seconds']:.1f} s, "
        f"{fit_info['bytes_total'] / 1e6:.1f} MB |\n")
    print(f"\n| HELIX demo: {FLAGS.source_model} → {FLAGS.target_model} head on {FLAGS.task_data} | |\n|---|---|\n"
          f"{fit_row}"
          f"| test queries | {len(labels)} |\n"
          f"| accuracy (encrypted) | {result['helix_accuracy']:.4f} |\n"
          f"| accuracy (plaintext pipeline) | {result['plaintext_accuracy']:.4f} |\n"
          f"| identical predictions | {result['prediction_agreement'] * 100:.1f}% |\n"
          f"| latency p50 / p99 | {summary['latency_ms_p50']:.1f} / {summary['latency_ms_p99']:.1f} ms |\n"
          f"| bytes per query (up + down) | {summary['bytes_per_query']:,.0f} |\n"
          f"| session keys (once per session) | {summary['session_setup_bytes'] / 1e6:.1f} MB |")
    if result["prediction_agreement"] != 1.0:
        raise LinalignError("encrypted and plaintext predictions differ")
    return result


def main(argv):
    del argv
    out_dir = Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run(out_dir)


if __name__ == "__main__":
    cli.run(main)
