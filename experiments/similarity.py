"""Similarity matrices between several models' embeddings of the same texts, with heatmaps.

    python -m experiments.similarity --models=all-MiniLM-L6-v2,all-mpnet-base-v2,SmolLM2-135M-Instruct,gemma-3-270m \
        --data=public --limit=1000 --out_dir=runs/similarity

--data is a text spec (`linalign_jax.data.load_texts`: `public`, a .txt file, a table, or a labelled dataset's train
split); a --models entry may be an embeddings file (.parquet, `linalign_jax.precomputed`). Inputs are checked before
any model loads. Embeddings are pooled (--pooling, default mean as in the paper's §2.3 for autoregressive models),
cached, and compared with every measure of `linalign_jax.similarity`. --out_dir is written into a temporary sibling
and swapped in whole at the end (a failed run leaves the old one untouched). Outputs: similarity.json (written last:
{"command", "config", "models": [{"spec", "fingerprint", "dim"}], "data": {"spec", "n", "fingerprint"},
"matrices": {measure: [[...]]}, "timing"}), similarity.md and one heatmap_<measure>.png per measure.
"""
from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from linalign_jax import cli
from linalign_jax.errors import LinalignError

FLAGS = flags.FLAGS
cli.define_model_flags(list_flag="models")
cli.define_data_flags("data")
cli.define_extraction_flags()
flags.DEFINE_list("measures", ["linear_cka", "linear_cka_debiased", "rbf_cka", "svcca64", "svcca128", "mutual_knn"],
                  "similarity measures (linalign_jax.similarity.MEASURES; svcca<dims>, cca_angle<dims>, "
                  "partial_whitening<alpha>[_<dims>] take any value)")
flags.DEFINE_enum("convention", "project", ["project", "platonic"], "preprocessing before every measure: as given, "
                  "or platonic-rep's (clip at the 0.95 quantile of |x|, L2-normalise; RBF σ=1)")
flags.DEFINE_integer("n_permutations", 100, "random row pairings of the permutation null (z-scores)")
flags.DEFINE_integer("seed", 0, "seed of the mutual-kNN permutations")
flags.DEFINE_string("out_dir", None, "output directory")
flags.DEFINE_integer("knn_k", 10, "neighbours of the mutual kNN measure (1 <= k < --limit)")
flags.mark_flags_as_required(["models", "data", "out_dir"])


def run(command: str) -> dict:
    """Check every input, then embed and compare into a staged copy of --out_dir."""
    from linalign_jax.data import checks, fingerprint, load_texts
    from linalign_jax.io_utils import check_outside, staged_dir
    from linalign_jax.similarity import KNN_MEASURES, check_measures

    if len(FLAGS.models) < 2:
        raise LinalignError(f"--models needs at least 2 specs, got {FLAGS.models}")
    check_measures(FLAGS.measures)
    checks.check_limits(limit=FLAGS.limit)
    check_outside(FLAGS.out_dir, feature_cache=FLAGS.feature_cache, data=FLAGS.data)
    texts = load_texts(FLAGS.data, limit=FLAGS.limit or None, seed=FLAGS.data_seed, text_column=FLAGS.text_column)
    checks.check_rows(FLAGS.data, len(texts), 4, "similarity", "raise --limit or give more texts")
    if set(KNN_MEASURES) & set(FLAGS.measures):
        checks.check_knn(FLAGS.knn_k, len(texts), f"({FLAGS.data}, --limit={FLAGS.limit})",
                         "lower --knn_k or raise --limit")
    with staged_dir(FLAGS.out_dir) as out_dir:
        return _run_into(out_dir, texts, fingerprint(texts), command)


def _run_into(out_dir: Path, texts: list, data_fp: str, command: str) -> dict:
    import jax
    import numpy as np

    from linalign_jax import reports
    from linalign_jax.embedders import open_embedder
    from linalign_jax.io_utils import atomic_write_json, atomic_write_text
    from linalign_jax.similarity import similarity_matrices

    start = time.perf_counter()
    features, models = {}, []
    for spec in FLAGS.models:
        embedder = open_embedder(spec, dtype=FLAGS.dtype)
        fs = embedder.features(texts, data_fp, data=FLAGS.data, **cli.extraction_options().cache_kwargs(embedder.model))
        features[spec] = fs.array
        models.append({**embedder.info(), "cache": fs.metadata.get("cache")})
        del embedder
    mats = similarity_matrices(features, FLAGS.measures, key=jax.random.key(FLAGS.seed), knn_k=FLAGS.knn_k,
                               n_permutations=FLAGS.n_permutations, convention=FLAGS.convention,
                               symmetric="cycle_knn" not in FLAGS.measures)
    names = [m["spec"] for m in models]
    for measure, mat in mats.items():
        if not measure.endswith("_z"):
            reports.plot_similarity(mat, names, f"{measure} ({FLAGS.data}, N={len(texts)}, {FLAGS.pooling} pooling)",
                                    out_dir / f"heatmap_{measure}.png")
    atomic_write_text(out_dir / "similarity.md", reports.similarity_markdown(mats, names, command))
    result = {"command": command, "models": models, "data": {"spec": FLAGS.data, "n": len(texts),
                                                             "fingerprint": data_fp},
              "config": {"pooling": FLAGS.pooling, "normalize": FLAGS.normalize, "max_length": FLAGS.max_length,
                         "measures": FLAGS.measures, "seed": FLAGS.seed, "data_seed": FLAGS.data_seed,
                         "knn_k": FLAGS.knn_k, "convention": FLAGS.convention, "n_permutations": FLAGS.n_permutations},
              "matrices": {k: np.asarray(v).tolist() for k, v in mats.items()},
              "timing": {"total_s": time.perf_counter() - start}}
    atomic_write_json(out_dir / "similarity.json", result)
    return result


def main(argv):
    run(cli.command_line())
    print((Path(FLAGS.out_dir) / "similarity.md").read_text())


if __name__ == "__main__":
    cli.run(main)
