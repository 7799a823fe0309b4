"""Layer sweep (paper App. E): every hidden layer of a source and a target model from one cached extraction pass,
layer × layer similarity and per-layer-pair alignment quality, with heatmaps.

    python -m experiments.layer_sweep --flagfile=configs/layer_sweep.flags

Definitions: `linalign_jax.evaluate.layers` (alignment quality, matched depth) and `linalign_jax.similarity`
(measures). Model, data and extraction flags are the shared groups of `linalign_jax.cli` (unset --pooling /
--normalize / --max_length: each model's own conventions; the values used are in "models"). Outputs in --out_dir
(written into a staged copy, swapped in whole at the end): layer_sweep.json
({"command", "config", "models", "data", "similarity": {measure: [[L_s + 1] x [L_t + 1]]}, "alignment": {"map_r2",
"map_top1", "accuracy_final_head", "accuracy_layer_head", "lambda": matrices, "native_accuracy": [L_t + 1]},
"matched_depth": [{"source_layer", "target_layer", ...quality}], "timing"}; written last), layer_sweep.md and one
heatmap_<name>.png per matrix (rows = source layers, columns = target layers; 0 = embeddings).
"""
from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from linalign_jax import cli
from linalign_jax.errors import LinalignError

FLAGS = flags.FLAGS
cli.define_model_flags("source_model", "target_model")
cli.define_data_flags("task_data")
cli.define_extraction_flags(every_layer=True)
flags.DEFINE_list("measures", ["linear_cka", "mutual_knn"], "layer x layer similarity measures (on the test rows)")
flags.DEFINE_integer("knn_k", 10, "neighbours of the kNN measures")
flags.DEFINE_integer("n_permutations", 20, "permutations of each measure's null")
flags.DEFINE_enum("convention", "project", ["project", "platonic"], "similarity preprocessing convention")
cli.define_ridge_flag(allow_cv=True)  # the per-layer maps
flags.DEFINE_integer("seed", 0, "seed of the heads and the permutations")
flags.DEFINE_string("out_dir", None, "output directory")
flags.mark_flags_as_required(["source_model", "target_model", "task_data", "out_dir"])


def run(command: str) -> dict:
    from linalign_jax.align.fit import MapConfig
    from linalign_jax.align.ridge import parse_lambda
    from linalign_jax.data.task import load_task_texts
    from linalign_jax.io_utils import check_outside, staged_dir
    from linalign_jax.similarity import check_measures

    check_measures(FLAGS.measures)
    map_config = MapConfig(ridge_lambda=parse_lambda(FLAGS.ridge_lambda, allow_cv=True))
    check_outside(FLAGS.out_dir, feature_cache=FLAGS.feature_cache, source_model=FLAGS.source_model,
                  target_model=FLAGS.target_model, task_data=FLAGS.task_data)
    data = load_task_texts(FLAGS.task_data, train_limit=FLAGS.train_limit, test_limit=FLAGS.test_limit,
                           seed=FLAGS.data_seed, text_column=FLAGS.text_column, label_column=FLAGS.label_column,
                           knn_k=FLAGS.knn_k if "knn" in ",".join(FLAGS.measures) else None)
    with staged_dir(FLAGS.out_dir) as out_dir:
        return _run_into(out_dir, data, map_config, command)


def _run_into(out_dir: Path, data: dict, map_config, command: str) -> dict:
    import jax
    import numpy as np

    from linalign_jax import reports
    from linalign_jax.embedders import open_embedder
    from linalign_jax.evaluate.layers import layer_alignment, layer_similarity, matched_depth
    from linalign_jax.io_utils import atomic_write_json, atomic_write_text

    start = time.perf_counter()
    feats, models = {}, {}
    for side in ("source", "target"):
        embedder = open_embedder(getattr(FLAGS, f"{side}_model"), dtype=FLAGS.dtype)
        options = {**cli.extraction_options().cache_kwargs(embedder.model), "layer": "all"}
        for split in ("train", "test"):
            fs = embedder.features(data[split][0], data=f"{FLAGS.task_data} ({split})", **options)
            if fs.array.ndim != 3:
                raise LinalignError(f"{embedder.spec} gives no per-layer states (an embeddings file?); the layer "
                                    "sweep needs a model")
            feats[side, split] = fs.array
        models[side] = {**embedder.info(), "hidden_states": int(feats[side, "train"].shape[0]),
                        **{k: options[k] for k in ("pooling", "normalize", "max_length", "instruction")}}
        del embedder
    extract_s = time.perf_counter() - start
    key = jax.random.key(FLAGS.seed)
    sims = layer_similarity(feats["source", "test"], feats["target", "test"], FLAGS.measures, key, FLAGS.knn_k,
                            FLAGS.n_permutations, FLAGS.convention)
    quality = layer_alignment(feats["source", "train"], feats["target", "train"], data["train"][1],
                              feats["source", "test"], feats["target", "test"], data["test"][1],
                              len(data["classes"]), key, map_config)
    diagonal = [{"source_layer": i, "target_layer": j,
                 **{k: float(v[i, j]) for k, v in quality.items() if np.ndim(v) == 2},
                 **{k: float(v[i, j]) for k, v in sims.items()}}
                for i, j in matched_depth(models["source"]["hidden_states"], models["target"]["hidden_states"])]
    matrices = {**{f"similarity_{k}": v for k, v in sims.items()},
                **{k: v for k, v in quality.items() if np.ndim(v) == 2}}
    names = (FLAGS.source_model, FLAGS.target_model)
    for name, mat in matrices.items():
        title = f"{name} ({FLAGS.task_data} test, {models['source']['pooling']} pooling)"
        reports.plot_layer_matrix(mat, *names, title, out_dir / f"heatmap_{name}.png")
    result = {"command": command, "models": models,
              "config": {k: FLAGS[k].value for k in ("task_data", "train_limit", "test_limit", "pooling", "normalize",
                                                     "max_length", "dtype", "measures", "knn_k", "n_permutations",
                                                     "convention", "ridge_lambda", "seed", "data_seed")},
              "data": {"n_train": len(data["train"][0]), "n_test": len(data["test"][0]), "classes": data["classes"]},
              "similarity": {k: v.tolist() for k, v in sims.items()},
              "alignment": {k: np.asarray(v).tolist() for k, v in quality.items()},
              "matched_depth": diagonal,
              "timing": {"extract_s": extract_s, "total_s": time.perf_counter() - start}}
    atomic_write_text(out_dir / "layer_sweep.md", reports.layer_sweep_markdown(result))
    atomic_write_json(out_dir / "layer_sweep.json", result)
    return result


def main(argv):
    run(cli.command_line())
    print((Path(FLAGS.out_dir) / "layer_sweep.md").read_text())


if __name__ == "__main__":
    cli.run(main)
