"""Main job: extract (cached) → fit maps → evaluate the paper's settings; writes results, tables, plots and maps.

    python -m experiments.align --flagfile=configs/demo.flags

Outputs in --out_dir:
    The whole folder is written into a temporary sibling and swapped in at the end: a failed or interrupted run leaves
the previous run's folder untouched, and a finished one replaces it whole (nothing of the old run is kept).
Every input is checked before any model is loaded (limits, classes, shots, mutual kNN's k; `data.checks`).
--source_model / --target_model may be embeddings files (.parquet, `linalign_jax.precomputed`).

results.json   written last: its presence means the run finished
    results.md     tables shaped like the paper's Tables 1, 2/6 and 7, plus map quality
    accuracy.png   accuracy per setting, mean ± std over seeds
    maps/<setting>/map.safetensors + map.json   the first seed's map of every mapped setting

results.json keys:
    command        the command line that produced it
    config         every flag value that matters (models, data specs, limits, pooling, map, λ, settings, shots, seeds)
    models         {"source"|"target": {"spec", "fingerprint", "family", "dim"}}
    data           {"task"|"ood"|"public": {"spec", "fingerprint" (sha256 of the texts used), "n_train", "n_test" |
                    "n", "classes"}}
    setting_ids    the settings in run order (JSON objects are written with sorted keys)
    settings       {setting_id: {"setting", "shots", "per_seed": [record...], "mean": {...}, "std": {...}}} with
                   setting_id in native | task_map | public | public+id@k | few_shot@k (k = --shots) and
                   record = {"seed", "accuracy", "{energy,msp,knn,mahalanobis}_{auroc,fpr95}" (when --ood_data;
                   knn / mahalanobis: feature-space detectors, linalign_jax.evaluate.ood), "map": {"r2", "cosine",
                   "top1", "top5", "lambda", "rank", "map_rows", "effective_rank", "stable_rank", "r2_dim_median"},
                   "map_diagnostics": {"singular_values", "r2_per_dim"} (mapped settings), "head_rows"
                   (few_shot)}; mean/std (ddof=1) over seeds of each number
    similarity     source vs target on the task test rows: --similarity_measures, default SIMILARITY_MEASURES
                   (linear/debiased/RBF CKA, SVCCA-64, mutual/cycle/LCS kNN, CKNNA, Procrustes and CCA-64 angular
                   distances, RSA), each permutation-tested measure with its "<measure>_z"
    timing         {"extract_s", "evaluate_s", "total_s", "cpu_s"}; "extract" lists each feature set's cache status
    complete       true (only ever written in a finished file)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from absl import flags

from linalign_jax import cli

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS
# source vs target on the test rows (definitions: linalign_jax.similarity); the shape distances are in radians
SIMILARITY_MEASURES = ("linear_cka", "linear_cka_debiased", "rbf_cka", "svcca64", "mutual_knn", "cknna", "cycle_knn",
                       "lcs_knn", "procrustes_angle", "cca_angle64", "rsa_spearman")
cli.define_model_flags("source_model", "target_model")
cli.define_data_flags("task_data", "ood_data", "public_data")
cli.define_extraction_flags()
flags.DEFINE_enum("map", "ridge", ["ridge", "optax", "procrustes", "rrr"], "map method")
cli.define_ridge_flag(allow_cv=True)  # used by ridge and rrr
flags.DEFINE_integer("cv_folds", 5, "folds for --ridge_lambda=cv")
flags.DEFINE_bool("procrustes_scale", True, "Procrustes: fit one global scale s (False: a pure rotation, s = 1)")
flags.DEFINE_list("similarity_measures", list(SIMILARITY_MEASURES),
                  "source-vs-target similarity measures on the test rows ('' = none; linalign_jax.similarity)")
flags.DEFINE_integer("ood_knn_k", 10, "k of the kNN OOD detector (cosine distance to the k-th training neighbour)")
flags.DEFINE_integer("rank", 64, "rank of the rrr map")
flags.DEFINE_enum("procrustes_dims", "zero", ["zero", "pca"], "Procrustes with different dims: zero-pad or PCA")
flags.DEFINE_enum("optax_loss", "mse", ["mse", "cosine"], "optax map loss")
flags.DEFINE_enum("optax_optimizer", "sgd", ["sgd", "adam", "adamw"], "optax map optimizer (sgd: plain gradient "
                  "descent, the ridge-like default)")
flags.DEFINE_float("optax_lr", 0.5, "optax map learning rate (relative to the input covariance's top eigenvalue)")
flags.DEFINE_enum("optax_schedule", "constant", ["constant", "cosine", "warmup_cosine"], "optax map lr schedule")
flags.DEFINE_integer("optax_epochs", 2000, "optax map: most epochs (early stopping usually ends training sooner)")
flags.DEFINE_integer("optax_patience", 20, "optax map: epochs without held-out improvement before stopping")
flags.DEFINE_integer("optax_batch_size", 4096, "optax map: rows per step")
flags.DEFINE_enum("optax_init", "ridge", ["zero", "ridge"], "optax map start: the ridge map (default: it lands within 1 pp of ridge on the demo) or W=0, b=mean(y)")
flags.DEFINE_list("settings", ["native", "task_map", "public", "public+id", "few_shot"], "settings to evaluate")
flags.DEFINE_list("shots", ["32", "64", "128"], "labelled task rows for public+id and few_shot (total, stratified)")
flags.DEFINE_bool("per_class_shots", False, "--shots counts rows per class instead of in total")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (heads, shots, optax maps); at least 3 for the paper's mean ± std")
flags.DEFINE_string("out_dir", None, "output directory")
flags.DEFINE_integer("knn_k", 10, "neighbours of the mutual kNN similarity (1 <= k < test rows)")
flags.mark_flags_as_required(["source_model", "target_model", "task_data", "out_dir"])


def extract_all(spec: str, sets: dict, cfg: dict) -> tuple[dict, dict]:
    """Features of every text set for one model or embeddings file (cached); returns ({name: array}, model info)."""
    from linalign_jax.embedders import embed_sets, open_embedder

    embedder = open_embedder(spec, dtype=cfg["dtype"])
    names = {name: f"{cfg[{'train': 'task_data', 'test': 'task_data'}.get(name, name + '_data')]} ({name})"
             for name in sets}
    feats, status = embed_sets(embedder, sets, cli.extraction_options(), names)
    return feats, {**embedder.info(), "extract": status}


def map_config_from(cfg: dict):
    from linalign_jax.align.fit import MapConfig
    from linalign_jax.align.optax_map import OptaxMapConfig

    return MapConfig(method=cfg["map"], ridge_lambda=cfg["ridge_lambda"], rank=cfg["rank"],
                     procrustes_dims=cfg["procrustes_dims"], procrustes_scale=cfg["procrustes_scale"],
                     cv_folds=cfg["cv_folds"],
                     optax=OptaxMapConfig(loss=cfg["optax_loss"], optimizer=cfg["optax_optimizer"],
                                          learning_rate=cfg["optax_lr"], schedule=cfg["optax_schedule"],
                                          max_epochs=cfg["optax_epochs"], patience=cfg["optax_patience"],
                                          batch_size=cfg["optax_batch_size"], init=cfg["optax_init"]))


def run(cfg: dict, command: str) -> dict:
    """The whole job into a staged copy of --out_dir (see the module docstring)."""
    from linalign_jax.io_utils import check_outside, staged_dir

    check_outside(cfg["out_dir"], feature_cache=cfg["feature_cache"],
                  **{k: cfg[k] for k in ("source_model", "target_model", "task_data", "ood_data", "public_data")})
    with staged_dir(cfg["out_dir"]) as out_dir:
        return _run_into(out_dir, cfg, command)


def _run_into(out_dir: Path, cfg: dict, command: str) -> dict:
    from linalign_jax import reports
    from linalign_jax.align import save_map
    from linalign_jax.data import fingerprint
    from linalign_jax.data.task import load_task_texts
    from linalign_jax.evaluate.settings import Paired, TaskFeatures, run_settings, setting_ids
    from linalign_jax.io_utils import atomic_write_json, atomic_write_text
    from linalign_jax.similarity import check_measures, similarity

    start, cpu_start = time.perf_counter(), time.process_time()
    ids = setting_ids(cfg["settings"], cfg["shots"])  # validates names before any expensive work
    map_config = map_config_from(cfg)
    check_measures(cfg["similarity_measures"])
    shot_settings = any(s in ("public+id", "few_shot") for s in cfg["settings"])
    data = load_task_texts(  # every input checked before a model loads
        cfg["task_data"], ood_data=cfg["ood_data"],
        public_data=cfg["public_data"] if any(s in ("public", "public+id", "unsupervised") for s in cfg["settings"])
        else "",
        shots=cfg["shots"] if shot_settings else (), knn_k=cfg["knn_k"], seed=cfg["data_seed"],
        **{k: cfg[k] for k in ("train_limit", "test_limit", "ood_limit", "public_limit", "per_class_shots",
                               "text_column", "label_column")})
    sets = {"train": data["train"][0], "test": data["test"][0]}
    sets.update({k: data[k] for k in ("ood", "public") if data[k] is not None})
    src, src_info = extract_all(cfg["source_model"], sets, cfg)
    tgt, tgt_info = extract_all(cfg["target_model"], sets, cfg)
    extract_s = time.perf_counter() - start

    def paired(name):
        return Paired(src[name], tgt[name]) if name in src else None

    feats = TaskFeatures(train=paired("train"), train_labels=data["train"][1], test=paired("test"),
                         test_labels=data["test"][1], num_classes=len(data["classes"]), ood=paired("ood"),
                         public=paired("public"))
    data_info = {"task": {"spec": cfg["task_data"], "n_train": len(sets["train"]), "n_test": len(sets["test"]),
                          "classes": data["classes"],
                          "fingerprint": fingerprint(sets["train"] + sets["test"])}}
    for name, spec_key in (("ood", "ood_data"), ("public", "public_data")):
        if name in sets:
            data_info[name] = {"spec": cfg[spec_key], "n": len(sets[name]), "fingerprint": fingerprint(sets[name])}

    def save(sid, affine, info):
        fit_rows = {"task_map": "task train", "public": "public", "unsupervised": "public, unpaired halves"}.get(
            sid, "public + task train shots")
        save_map(out_dir / "maps" / sid.replace("@", "_"), affine, {
            "source_model": cfg["source_model"], "target_model": cfg["target_model"],
            "source_fingerprint": src_info["fingerprint"], "target_fingerprint": tgt_info["fingerprint"],
            "pooling": cfg["pooling"], "layer": cfg["layer"], "normalize": cfg["normalize"],
            "max_length": cfg["max_length"],
            "setting": sid, "fit_data": fit_rows, "data_fingerprint": data_info.get(
                "task" if sid == "task_map" else "public", {}).get("fingerprint"),
            **{k: v for k, v in info.items() if k not in ("history", "lambda_grid", "gcv")}})

    eval_start = time.perf_counter()
    settings = run_settings(feats, ids, cfg["seeds"], map_config, per_class_shots=cfg["per_class_shots"],
                            on_map=save, ood_knn_k=cfg["ood_knn_k"])
    results = {
        "command": command, "config": cfg, "models": {"source": src_info, "target": tgt_info}, "data": data_info,
        "setting_ids": ids, "settings": settings,
        "similarity": similarity(src["test"], tgt["test"], cfg["similarity_measures"], knn_k=cfg["knn_k"]),
        "timing": {"extract_s": extract_s, "evaluate_s": time.perf_counter() - eval_start},
    }
    reports.plot_accuracy(results, out_dir / "accuracy.png")
    results["timing"].update(total_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu_start)
    results["complete"] = True
    atomic_write_text(out_dir / "results.md", reports.results_markdown(results))
    atomic_write_json(out_dir / "results.json", results)  # last: its presence means the run finished
    return results


def config_from_flags() -> dict:
    from linalign_jax.align.ridge import parse_lambda

    lam = parse_lambda(FLAGS.ridge_lambda, allow_cv=True)
    shots, seeds = cli.int_list("shots"), cli.int_list("seeds")
    keys = ("source_model", "target_model", "task_data", "ood_data", "public_data", "pooling", "normalize", "map",
            "rank", "procrustes_dims", "procrustes_scale", "cv_folds", "ood_knn_k", "similarity_measures",
            "per_class_shots", "optax_loss",
            "optax_optimizer", "optax_lr", "optax_schedule", "optax_epochs", "optax_patience", "optax_batch_size",
            "optax_init", "settings", "out_dir", "public_limit", "train_limit", "test_limit", "ood_limit", "layer",
            "max_length", "batch_size", "dtype", "data_seed", "feature_cache", "knn_k", "text_column", "label_column")
    return {**{k: FLAGS[k].value for k in keys}, "ridge_lambda": lam, "shots": shots, "seeds": seeds}


def main(argv):
    command = cli.command_line()
    results = run(config_from_flags(), command)
    out = Path(FLAGS.out_dir)
    log.info(f"wrote {out / 'results.json'} and {out / 'results.md'} in {results['timing']['total_s']:.0f}s")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    cli.run(main)
