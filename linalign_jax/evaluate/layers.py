"""Layer sweeps (the paper's App. E depth ablation, for classification): every hidden layer of both models from one
extraction pass (`features.extract_features(layer="all")`, arrays [L + 1, N, d]), then

* layer × layer similarity: any `linalign_jax.similarity` measure between source layer i and target layer j
  (with its permutation z where the measure has one);
* layer × layer alignment quality of a ridge map fitted on the train rows from source layer i to target layer j,
  scored on the test rows: R², retrieval top-1 (true target among all test targets by cosine), and task accuracy
  through the target's head trained on its FINAL layer (App. E: the frozen head reads the mapped state of layer
  j — early layers decode poorly however well they align) and through a head trained on target layer j itself
  (how much task information the map carries at that depth);
* the matched-depth diagonal of App. E's table: source layer i paired with target layer round(i · L_t / L_s).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from linalign_jax.align.fit import MapConfig, fit_map
from linalign_jax.align.maps import apply_map
from linalign_jax.align.metrics import map_metrics
from linalign_jax.errors import LinalignError
from linalign_jax.evaluate.heads import HeadConfig, accuracy, train_head
from linalign_jax.io_utils import Progress
from linalign_jax.similarity import cross_similarity

QUALITY = ("map_r2", "map_top1", "accuracy_final_head", "accuracy_layer_head")


def matched_depth(source_layers: int, target_layers: int) -> list[tuple[int, int]]:
    """(source layer, target layer) at the same relative depth, for hidden-state counts L_s + 1 and L_t + 1."""
    ls, lt = source_layers - 1, target_layers - 1
    return [(i, int(round(i * lt / max(ls, 1)))) for i in range(source_layers)]


def _check_layers(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise LinalignError(f"{name} must be per-layer features [L + 1, N, d] (extract with layer='all'), got "
                            f"shape {a.shape}")
    return a


def layer_similarity(source: np.ndarray, target: np.ndarray, measures: Sequence[str], key: jax.Array | None = None,
                     knn_k: int = 10, n_permutations: int = 100, convention: str = "project") -> dict[str, np.ndarray]:
    """{measure: [L_s + 1, L_t + 1]} of measure(source[i], target[j]) on the same rows."""
    source, target = _check_layers("source", source), _check_layers("target", target)
    return cross_similarity({f"source_{i}": a for i, a in enumerate(source)},
                            {f"target_{j}": b for j, b in enumerate(target)}, measures, key, knn_k, n_permutations,
                            convention)


def layer_alignment(train_source: np.ndarray, train_target: np.ndarray, train_labels: np.ndarray,
                    test_source: np.ndarray, test_target: np.ndarray, test_labels: np.ndarray, num_classes: int,
                    key: jax.Array, map_config: MapConfig = MapConfig(), head_config: HeadConfig = HeadConfig()
                    ) -> dict:
    """{"map_r2" | "map_top1" | "accuracy_final_head" | "accuracy_layer_head": [L_s + 1, L_t + 1] matrices,
    "native_accuracy": [L_t + 1] (target head of layer j on target layer j), "lambda": [L_s + 1, L_t + 1]}."""
    train_source, train_target = _check_layers("train_source", train_source), _check_layers("train_target",
                                                                                             train_target)
    test_source, test_target = _check_layers("test_source", test_source), _check_layers("test_target", test_target)
    ns, nt = len(train_source), len(train_target)
    heads = [train_head(train_target[j], train_labels, num_classes, jax.random.fold_in(key, j), head_config)
             for j in range(nt)]
    out = {name: np.full((ns, nt), np.nan) for name in QUALITY + ("lambda",)}
    out["native_accuracy"] = np.asarray([accuracy(h, test_target[j], test_labels) for j, h in enumerate(heads)])
    progress = Progress("layer pairs", total=ns * nt, unit="maps")
    for i in range(ns):
        for j in range(nt):
            affine, info = fit_map(train_source[i], train_target[j], map_config, jax.random.fold_in(key, 1000 + i))
            mapped = apply_map(affine, test_source[i])
            quality = map_metrics(mapped, test_target[j])
            out["map_r2"][i, j], out["map_top1"][i, j] = quality["r2"], quality["top1"]
            out["accuracy_final_head"][i, j] = accuracy(heads[-1], mapped, test_labels)
            out["accuracy_layer_head"][i, j] = accuracy(heads[j], mapped, test_labels)
            out["lambda"][i, j] = info.get("lambda", np.nan)
            progress.update()
    progress.close()
    return out
