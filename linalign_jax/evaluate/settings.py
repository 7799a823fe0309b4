"""The paper's evaluation settings (Tables 1, 2, 6 and 7) over precomputed features, each repeated over seeds.

Party A = target model: owns the labelled task data and the linear head trained on its own train-split embeddings.
Party B = source model: embeds the test inputs and maps them into A's space; A's head classifies the mapped vectors.

    native       A's head on A's test embeddings                       ("Full" / "Baseline" columns)
    task_map     map fitted on the task train split (paired rows)      (Table 1, "LinMap")
    public       map fitted on the public corpus only                  ("Public Only")
    public+id@k  map fitted on public + k labelled train rows          ("Public + ID k")
    few_shot@k   B's own head trained on k labelled train rows of its  ("Baseline k": what the client can do alone)
                 own embeddings, applied to B's test embeddings
    unsupervised map fitted WITHOUT pairs (`align.unsupervised`): B embeds the first half of the public corpus, A
                 the second half, so no text is seen by both (not in the paper; the no-paired-data baseline)

Shots k are k rows of the train split in total, stratified by class (the paper's "64 in-distribution samples"), or k
rows per class with `per_class_shots=True`; a fresh draw per seed. OOD metrics (Energy AUROC as in the paper, plus
MSP AUROC and FPR@95TPR) score ID test rows against OOD rows with the same head and the same path (mapped or native).
The feature-space detectors (kNN, Mahalanobis; `linalign_jax.evaluate.ood`) score the same rows in the head's space
against the labelled rows the head was trained on: A's train embeddings for native and mapped settings (so for a
mapped setting the detector runs on B's mapped embeddings, with A's reference rows), B's own shot rows for few_shot.
Mapped settings also record the map's diagnostics (singular spectrum of W, effective rank, R² per target dimension).
Per seed: a fresh head, fresh shots, and for the optax map a fresh map; maps of deterministic methods are fitted once.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from linalign_jax.align.fit import MapConfig, fit_map, ridge_statistics
from linalign_jax.align.maps import AffineMap, apply_map
from linalign_jax.align.metrics import map_diagnostics, map_metrics
from linalign_jax.align.unsupervised import fit_unsupervised
from linalign_jax.errors import LinalignError
from linalign_jax.evaluate.heads import HeadConfig, LinearHead, accuracy, train_head
from linalign_jax.evaluate.ood import FeatureDetectors, feature_ood_metrics, fit_feature_detectors, ood_metrics
from linalign_jax.io_utils import Progress

SETTINGS = ("native", "task_map", "public", "public+id", "few_shot", "unsupervised")
SHOT_SETTINGS = ("public+id", "few_shot")


@dataclasses.dataclass(frozen=True)
class Paired:
    """The same rows embedded by both models."""

    source: np.ndarray  # [N, d_source]
    target: np.ndarray  # [N, d_target]

    def __post_init__(self):
        if self.source.shape[0] != self.target.shape[0]:
            raise LinalignError(f"paired features disagree on N: source {self.source.shape}, target "
                                f"{self.target.shape}")

    def take(self, idx: np.ndarray) -> "Paired":
        return Paired(self.source[idx], self.target[idx])


@dataclasses.dataclass(frozen=True)
class TaskFeatures:
    train: Paired
    train_labels: np.ndarray
    test: Paired
    test_labels: np.ndarray
    num_classes: int
    ood: Paired | None = None
    public: Paired | None = None


def setting_ids(settings: Sequence[str], shots: Sequence[int]) -> list[str]:
    """Expand e.g. ["native", "few_shot"] with shots [32, 64] to ["native", "few_shot@32", "few_shot@64"]."""
    out = []
    for s in settings:
        if s not in SETTINGS:
            raise LinalignError(f"unknown setting {s!r}; known: {SETTINGS}")
        out.extend([f"{s}@{k}" for k in shots] if s in SHOT_SETTINGS else [s])
    return out


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, key: jax.Array, per_class: bool = False
                 ) -> np.ndarray:
    """Row indices of a k-shot sample of the train split, drawn per seed.

    per_class=False (the paper's "64 in-distribution samples"): `shots` rows in total, stratified (each class gets its
    proportional share, largest remainder). per_class=True: `shots` rows of every class; error if a class has fewer.
    """
    from linalign_jax.data.splits import stratified_split

    labels = np.asarray(labels)
    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    if not per_class:
        if not 1 <= shots < len(labels):
            raise LinalignError(f"{shots} shots requested, but the train split has {len(labels)} rows")
        return np.sort(stratified_split(labels, shots, seed)[1])
    counts = np.bincount(labels, minlength=num_classes)
    if shots < 1 or counts.min() < shots:
        raise LinalignError(f"{shots} shots per class requested, but the train split has only {counts.min()} rows "
                            f"in its smallest class (per-class counts {counts.tolist()})")
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)]))


def run_settings(feats: TaskFeatures, ids: Sequence[str], seeds: Sequence[int], map_config: MapConfig,
                 head_config: HeadConfig = HeadConfig(), per_class_shots: bool = False,
                 on_map: Callable[[str, AffineMap, dict], None] | None = None, ood_knn_k: int = 10) -> dict:
    """{setting_id: {"setting", "shots", "per_seed": [...], "mean": {...}, "std": {...}}}.

    `on_map(setting_id, map, info)` is called for the first seed's map of each mapped setting (for saving).
    """
    if len(seeds) < 1:
        raise LinalignError("need at least one seed")
    needs_public = any(i in ("public", "unsupervised") or i.startswith("public+id") for i in ids)
    if needs_public and feats.public is None:
        raise LinalignError("public / public+id / unsupervised settings need public-corpus features")
    # Maps that depend on nothing random (no shots, closed-form method) are fitted once and reused across seeds.
    deterministic = map_config.method != "optax"
    public_stats = None
    if needs_public and map_config.method in ("ridge", "rrr") and map_config.ridge_lambda != "cv":
        public_stats = ridge_statistics(feats.public.source, feats.public.target, map_config)
    fitted: dict[str, tuple[AffineMap, dict]] = {}
    target_detectors = None
    if feats.ood is not None:
        target_detectors = fit_feature_detectors(feats.train.target, feats.train_labels, feats.num_classes, ood_knn_k)
    results = {i: {"setting": i.split("@")[0], "shots": _shots(i), "per_seed": []} for i in ids}
    progress = Progress("settings", total=len(ids) * len(seeds), unit="runs", every=0.0)
    for seed in seeds:
        key = jax.random.key(seed)
        target_head = None
        for n, sid in enumerate(ids):
            sub = jax.random.fold_in(key, n)
            name, shots = sid.split("@")[0], _shots(sid)
            if name == "few_shot":
                rows = sample_shots(feats.train_labels, shots, feats.num_classes, sub, per_class_shots)
                head = train_head(feats.train.source[rows], feats.train_labels[rows], feats.num_classes,
                                  jax.random.fold_in(sub, 1), head_config)
                detectors = None if feats.ood is None else fit_feature_detectors(
                    feats.train.source[rows], feats.train_labels[rows], feats.num_classes, ood_knn_k)
                record = _evaluate(head, feats.test.source, feats.test_labels,
                                   None if feats.ood is None else feats.ood.source, detectors)
                record["head_rows"] = int(len(rows))
            else:
                if target_head is None:
                    target_head = train_head(feats.train.target, feats.train_labels, feats.num_classes,
                                             jax.random.fold_in(key, 10_000), head_config)
                if name == "native":
                    record = _evaluate(target_head, feats.test.target, feats.test_labels,
                                       None if feats.ood is None else feats.ood.target, target_detectors)
                else:
                    if not ((deterministic or name == "unsupervised") and shots is None and sid in fitted):
                        fitted[sid] = _fit_setting(name, shots, feats, map_config, public_stats, sub,
                                                   per_class_shots)
                        if on_map is not None and len(results[sid]["per_seed"]) == 0:
                            on_map(sid, *fitted[sid])
                    affine, info = fitted[sid]
                    mapped = apply_map(affine, feats.test.source)
                    record = _evaluate(target_head, mapped, feats.test_labels,
                                       None if feats.ood is None else apply_map(affine, feats.ood.source),
                                       target_detectors)
                    diagnostics = map_diagnostics(affine.W, mapped, feats.test.target)
                    record["map"] = {**map_metrics(mapped, feats.test.target),
                                     **{k: info[k] for k in ("lambda", "rank", "map_rows") if k in info},
                                     "effective_rank": diagnostics["effective_rank"],
                                     "stable_rank": diagnostics["stable_rank"],
                                     "r2_dim_median": float(np.median(diagnostics["r2_per_dim"]))}
                    record["map_diagnostics"] = {k: diagnostics[k] for k in ("singular_values", "r2_per_dim")}
            record["seed"] = int(seed)
            results[sid]["per_seed"].append(record)
            progress.update()
    progress.close()
    for entry in results.values():
        entry["mean"], entry["std"] = summarize(entry["per_seed"])
    return results


def _fit_setting(name: str, shots: int | None, feats: TaskFeatures, config: MapConfig, public_stats,
                 key: jax.Array, per_class_shots: bool) -> tuple[AffineMap, dict]:
    if name == "unsupervised":
        half = feats.public.source.shape[0] // 2
        affine, info = fit_unsupervised(feats.public.source[:half], feats.public.target[half:])
        info["map_rows"] = int(feats.public.source.shape[0])
        return affine, info
    if name == "task_map":
        pairs, base = feats.train, None
    elif name == "public":
        pairs, base = feats.public, None
    else:  # public+id: the shots are added to the public rows
        rows = sample_shots(feats.train_labels, shots, feats.num_classes, key, per_class_shots)
        shots_pairs = feats.train.take(rows)
        if public_stats is not None:
            pairs, base = shots_pairs, public_stats
        else:
            pairs = Paired(np.concatenate([feats.public.source, shots_pairs.source]),
                           np.concatenate([feats.public.target, shots_pairs.target]))
            base = None
    affine, info = fit_map(pairs.source, pairs.target, config, jax.random.fold_in(key, 2), base_stats=base)
    info["map_rows"] = int(pairs.source.shape[0] + (0 if base is None else base.n))
    return affine, info


def _evaluate(head: LinearHead, test: np.ndarray, labels: np.ndarray, ood: np.ndarray | None,
              detectors: FeatureDetectors | None = None) -> dict:
    record = {"accuracy": accuracy(head, test, labels)}
    if ood is not None:
        record.update(ood_metrics(head.logits(test), head.logits(ood)))
        if detectors is not None:
            record.update(feature_ood_metrics(detectors, test, ood))
    return record


def summarize(per_seed: list[dict]) -> tuple[dict, dict]:
    """Mean and sample std (ddof=1; 0 for one seed) of every numeric field, nested one level for "map"."""
    def collect(records):
        keys = [k for k, v in records[0].items() if isinstance(v, (int, float)) and k != "seed"]
        vals = {k: np.array([r[k] for r in records], np.float64) for k in keys}
        mean = {k: float(v.mean()) for k, v in vals.items()}
        std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in vals.items()}
        return mean, std

    mean, std = collect(per_seed)
    if "map" in per_seed[0]:
        mean["map"], std["map"] = collect([r["map"] for r in per_seed])
    return mean, std


def _shots(sid: str) -> int | None:
    return int(sid.split("@")[1]) if "@" in sid else None
