"""HELIX client (party B): classify through a remote provider's encrypted head, or fit a map with it securely.

    python -m experiments.helix_client --flagfile=configs/helix_client.flags                 # --mode=classify
    python -m experiments.helix_client --mode=fit --provider=HOST:PORT --token_file=... \
        --model=all-MiniLM-L6-v2 --public_data=public --public_limit=4096 --rank=64 --map_out=maps/secure

classify: embeds --task_data's test split with its own --model (or reads --features/--labels .npy), maps it locally
with --map, encrypts each query under fresh session keys, and writes --out (JSON): a summary (accuracy, latency p50/p99,
bytes per query) and one record per query (label, prediction, latency_ms, bytes_up, bytes_down). --bulk sends all
queries feature-major in one streamed call (thousands of queries per ciphertext; no per-query latency then).
With --plaintext_head (the provider's saved head, where you have it: tests, one-machine runs) it also prints the
plaintext pipeline's accuracy next to the encrypted one.
fit: runs the secure map fit (paper §3.2) on the public set and saves the map to --map_out only once it is complete.

Before embedding anything the client checks what must match: the provider's public set (spec, limit, seed) for a fit,
the map's model, pooling and normalisation against this client's flags for classify, and the provider's CKKS preset
(128-bit only, unless --allow_insecure_preset_for_tests). Without --tls_ca it talks only to a loopback address unless
--allow_plaintext.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from absl import flags

from linalign_jax import cli
from linalign_jax.errors import LinalignError

FLAGS = flags.FLAGS
cli.define_helix_flags()
cli.define_model_flags("model")
cli.define_data_flags("task_data", "public_data", defaults={"public_limit": 4096}, omit=("train_limit",))
cli.define_extraction_flags(model_conventions=False)
flags.DEFINE_enum("mode", "classify", ["classify", "fit"], "what to do with the provider")
flags.DEFINE_bool("bulk", False, "classify: all queries in one streamed feature-major call (no per-query latency)")
flags.DEFINE_string("plaintext_head", "", "classify: the provider's saved head, to print the plaintext accuracy too")
flags.DEFINE_float("fit_timeout_s", 3600.0, "deadline of the whole secure fit")
flags.DEFINE_string("map", "", "saved map directory (classify)")
flags.DEFINE_string("features", "", ".npy client embeddings to classify (instead of --model/--task_data)")
flags.DEFINE_string("labels", "", ".npy labels for --features")
flags.DEFINE_float("input_bound", 0.0, "public bound on |mapped embedding| entries (0 = next power of two of the data)")
flags.DEFINE_string("out", "", "classify: predictions JSON")
flags.DEFINE_string("public_features", "", "fit: .npy client embeddings of the public set (instead of --model)")
flags.DEFINE_integer("rank", 0, "fit: 0 = full-rank map, r = both sides reduce to their own top-r PCA basis")
cli.define_ridge_flag()  # fit
flags.DEFINE_integer("batch_columns", 8, "fit: column ciphertexts per message")
flags.DEFINE_string("map_out", "", "fit: where the map is saved (atomically, only after a complete fit)")


def _embed(texts: list[str]) -> np.ndarray:
    return cli.embed_with_flags(texts, "unless embeddings are given as .npy files")


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LinalignError(f"{what} {path}: {e}") from None


def connect():
    from linalign_jax.serve.client import ProviderClient

    target = FLAGS.provider
    if FLAGS.provider_file:
        try:
            with open(FLAGS.provider_file) as f:
                where = json.load(f)
            target = f"{where['host']}:{where['port']}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LinalignError(f"--provider_file {FLAGS.provider_file} is not a provider's port file: {e}") from None
    return ProviderClient(target, token=cli.helix_token(), tls_ca=FLAGS.tls_ca or None,
                          tls_server_name=FLAGS.tls_server_name or None, allow_plaintext=FLAGS.allow_plaintext,
                          allow_insecure_preset_for_tests=FLAGS.allow_insecure_preset_for_tests,
                          timeout_s=FLAGS.timeout_s)


def _same_model(a: str, b: str) -> bool:
    """Specs naming the same model: an asset name and its hub id ('all-MiniLM-L6-v2' and
    'sentence-transformers/all-MiniLM-L6-v2') or the same path."""
    return a.rstrip("/").rsplit("/", 1)[-1].split("@")[0] == b.rstrip("/").rsplit("/", 1)[-1].split("@")[0]


def check_map(meta: dict, path: str) -> None:
    """The map must have been fitted on features made the way this client will make them (issue 16: a map from
    another model, pooling or normalisation gives near-chance accuracy without any error)."""
    if FLAGS.features:
        return  # the caller embedded the queries itself
    problems = []
    source = meta.get("source_model")
    if source and FLAGS.model and not _same_model(str(source), FLAGS.model):
        problems.append(f"it maps from model {source!r}, this client embeds with --model={FLAGS.model}")
    if meta.get("pooling", FLAGS.pooling) != FLAGS.pooling:
        problems.append(f"it was fitted on {meta['pooling']!r} pooling, this client uses --pooling={FLAGS.pooling}")
    # maps without the key (experiments.scale_out) were fitted on unnormalised features, the library default
    normalized = bool(meta.get("normalize", False))
    if normalized != FLAGS.normalize:
        problems.append(f"it was fitted on {'L2-normalised' if normalized else 'unnormalised'} features, this client "
                        f"uses --{'' if FLAGS.normalize else 'no'}normalize")
    if meta.get("max_length", FLAGS.max_length) != FLAGS.max_length:
        problems.append(f"it was fitted with max_length {meta['max_length']}, this client uses "
                        f"--max_length={FLAGS.max_length}")
    if problems:
        raise LinalignError(f"map {path} does not fit this client: {'; '.join(problems)}. Use the flags the map "
                            f"was fitted with, or fit a map for these")


def check_public_set(info: dict, n_rows: int | None) -> None:
    """Both parties must embed the same public texts in the same order (issue 16: a different --data_seed gives a
    map with λ 135 and 21% accuracy, silently)."""
    if "fit" not in info:
        raise LinalignError(f"the provider serves no public set, so it cannot run a secure fit")
    advertised = info.get("provider", {}).get("public_data")
    if advertised and not FLAGS.public_features:
        mine = {"spec": FLAGS.public_data, "limit": FLAGS.public_limit, "seed": FLAGS.data_seed}
        wrong = [f"--{flag}={mine[key]} (provider: {advertised[key]})" for key, flag in
                 (("spec", "public_data"), ("limit", "public_limit"), ("seed", "data_seed"))
                 if mine[key] != advertised.get(key)]
        if wrong:
            raise LinalignError(f"the provider's public set is {info['fit']['public_set']!r}; this client would "
                                f"embed another one: {', '.join(wrong)}. Use the provider's values")
    if n_rows is not None and n_rows != info["fit"]["n"]:
        raise LinalignError(f"the client's public set has {n_rows} rows, the provider's {info['fit']['public_set']!r} "
                            f"has {info['fit']['n']} (same texts, same order)")


def task_embeddings() -> tuple[np.ndarray, np.ndarray]:
    if FLAGS.features:
        Z = _load_npy(FLAGS.features, "--features")
        labels = _load_npy(FLAGS.labels, "--labels") if FLAGS.labels else np.full(len(Z), -1)
        return Z, labels
    if not FLAGS.task_data:
        raise LinalignError("give --task_data (with --model) or --features")
    from linalign_jax.data import load_dataset
    from linalign_jax.data.splits import stratified_subsample

    test = load_dataset(FLAGS.task_data, seed=FLAGS.data_seed, text_column=FLAGS.text_column,
                        label_column=FLAGS.label_column)["test"]
    labels = np.asarray(test["label"])
    keep = stratified_subsample(labels, FLAGS.test_limit, FLAGS.data_seed)
    return _embed([test["text"][i] for i in keep]), labels[keep]


def classify() -> dict:
    from linalign_jax.align import apply_map, load_map
    from linalign_jax.helix.encoding import input_bound
    from linalign_jax.io_utils import atomic_write_json
    from linalign_jax.serve import parties

    if not FLAGS.map:
        raise LinalignError("--map (a saved map directory) is required to classify")
    affine, meta = load_map(FLAGS.map)
    check_map(meta, FLAGS.map)
    with connect() as client:
        info = client.info()  # before embedding: a wrong address or token fails in a second
        head = meta.get("helix_head", "base")
        if head == "base" and affine.target_dim != info["head"]["d"]:
            raise LinalignError(f"map {FLAGS.map} outputs dim {affine.target_dim}, the provider's head takes "
                                f"{info['head']['d']}")
        Z, labels = task_embeddings()
        mapped = apply_map(affine, np.asarray(Z, np.float32)).astype(np.float64)
        bound = FLAGS.input_bound or input_bound(mapped)
        run = (parties.classify_bulk if FLAGS.bulk else parties.classify)(
            client, mapped, head=head, k=info["head"]["k"], input_bound=bound, preset=info.get("preset"),
            timeout_s=FLAGS.timeout_s)
    predictions = run.logits.argmax(1)
    labelled = bool(len(labels)) and (labels >= 0).all()
    summary = {**run.summary(), "provider": client.target, "head": head, "input_bound": bound, "bulk": FLAGS.bulk,
               "accuracy": float(np.mean(predictions == labels)) if labelled else None,
               "plaintext_accuracy": None, "prediction_agreement": None}
    if FLAGS.plaintext_head:
        from linalign_jax.serve.heads import load_head

        plain = load_head(FLAGS.plaintext_head)[0]
        if plain.dims != (mapped.shape[1], run.logits.shape[1]):
            raise LinalignError(f"--plaintext_head {FLAGS.plaintext_head} has shape {plain.dims}, the queries "
                                f"need [{mapped.shape[1]}, {run.logits.shape[1]}] (a fitted head variant?)")
        plain_pred = (mapped @ plain.V + plain.c).argmax(1)
        summary["prediction_agreement"] = float(np.mean(plain_pred == predictions))
        summary["plaintext_accuracy"] = float(np.mean(plain_pred == labels)) if labelled else None
    records = [{"i": i, "label": int(labels[i]), "prediction": int(predictions[i]),
                "latency_ms": float(run.latency_s[i] * 1e3), "bytes_up": int(run.bytes_up[i]),
                "bytes_down": int(run.bytes_down[i])} for i in range(len(predictions))]
    if FLAGS.out:
        atomic_write_json(FLAGS.out, {"command": cli.command_line(), "summary": summary, "labels": info["head"]["labels"],
                                      "predictions": records, "logits": run.logits})
    acc = "n/a" if summary["accuracy"] is None else f"{summary['accuracy']:.4f}"
    plain_acc = ("n/a (give --plaintext_head)" if summary["prediction_agreement"] is None else
                 f"{summary['plaintext_accuracy']:.4f} ({summary['prediction_agreement'] * 100:.1f}% same predictions)"
                 if summary["plaintext_accuracy"] is not None else
                 f"n/a ({summary['prediction_agreement'] * 100:.1f}% same predictions)")
    print(f"| queries | accuracy (encrypted) | accuracy (plaintext) | p50 ms | p99 ms | bytes/query (up + down) | "
          f"session setup |\n|---|---|---|---|---|---|---|\n"
          f"| {summary['queries']} | {acc} | {plain_acc} | {summary['latency_ms_p50']:.2f} | "
          f"{summary['latency_ms_p99']:.2f} | {summary['bytes_per_query']:,.0f} ({summary['bytes_up_per_query']:,.0f} + "
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
    start = time.perf_counter()
    with connect() as client:
        info = client.info()
        check_public_set(info, None)  # before embedding (16 s for 4,096 texts)
        if FLAGS.public_features:
            Z_B = _load_npy(FLAGS.public_features, "--public_features")
        else:
            from linalign_jax.data import load_texts

            Z_B = _embed(load_texts(FLAGS.public_data, limit=FLAGS.public_limit, seed=FLAGS.data_seed,
                                    text_column=FLAGS.text_column))
        check_public_set(info, len(Z_B))
        run = secure_fit(client, Z_B, rank=FLAGS.rank, lam=lam, batch_columns=FLAGS.batch_columns,
                         timeout_s=FLAGS.fit_timeout_s)
    save_map(FLAGS.map_out, run.affine, {**run.info, "source_model": FLAGS.model or FLAGS.public_features,
                                         "pooling": FLAGS.pooling, "normalize": FLAGS.normalize,
                                         "max_length": FLAGS.max_length, "provider": client.target,
                                         "command": cli.command_line()})
    print(f"secure fit: map [{run.affine.source_dim} -> {run.affine.target_dim}] (rank {FLAGS.rank or 'full'}, "
          f"λ={run.info['lambda']:.3g}) saved to {FLAGS.map_out} in {time.perf_counter() - start:.1f} s, "
          f"{run.info['bytes_total'] / 1e6:.1f} MB exchanged (keys {run.info['key_bundle_bytes'] / 1e6:.1f} MB, "
          f"up {run.info['bytes_up'] / 1e6:.1f} MB, down {run.info['bytes_down'] / 1e6:.1f} MB)")
    return run.info


def main(argv):
    del argv
    classify() if FLAGS.mode == "classify" else fit()


if __name__ == "__main__":
    cli.run(main)
