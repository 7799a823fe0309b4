"""End to end: `experiments.align` between two different real models (MiniLM, d=384, as the source; MPNet, d=768, as
the target) on small local datasets. The saved map must have the source's rows and the target's columns and must
reproduce the recorded map quality on the two models' cached test features, so a transposed map or swapped roles
fail. Then a failed run into the same folder must leave the old run's folder untouched."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from linalign_jax.align import apply_map, load_map, map_metrics

SOURCE, TARGET = ("all-MiniLM-L6-v2", 384), ("all-mpnet-base-v2", 768)

TOPICS = ["Paris", "rivers", "the moon", "chess", "volcanoes", "jazz", "bread", "glaciers", "tigers", "painting",
          "trains", "coffee", "the ocean", "gardens", "bridges", "winter"]


def _write(tmp_path):
    rows = [(f"What do you know about {t}?", "question") for t in TOPICS] + \
           [(f"Where can I learn about {t}?", "question") for t in TOPICS] + \
           [(f"I really loved the film about {t}.", "opinion") for t in TOPICS] + \
           [(f"That story about {t} was boring.", "opinion") for t in TOPICS]
    for name, data in (("task.csv", rows), ("ood.csv", [(f"Stock {i} fell by {i % 7} points", "x" if i % 2 else "y")
                                                         for i in range(40)])):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(data)
    (tmp_path / "public.txt").write_text("\n".join(f"A note on {t}, number {i}." for i in range(4) for t in TOPICS))


def _run(tmp_path, *extra):
    cmd = [sys.executable, "-m", "experiments.align", f"--source_model={SOURCE[0]}",
           f"--target_model={TARGET[0]}", f"--task_data={tmp_path / 'task.csv'}",
           f"--ood_data={tmp_path / 'ood.csv'}", f"--public_data={tmp_path / 'public.txt'}", "--max_length=32",
           "--shots=4", "--seeds=0,1,2", f"--out_dir={tmp_path / 'out'}", f"--feature_cache={tmp_path / 'cache'}",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_main_job_end_to_end_and_interrupted_run(tmp_path):
    _write(tmp_path)
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert set(results) >= {"command", "config", "models", "data", "settings", "similarity", "timing"}
    assert results["setting_ids"] == ["native", "task_map", "public", "public+id@4", "few_shot@4"]
    assert set(results["settings"]) == set(results["setting_ids"])
    for entry in results["settings"].values():
        assert len(entry["per_seed"]) == 3
    native, task_map = results["settings"]["native"]["mean"], results["settings"]["task_map"]["mean"]
    assert native["accuracy"] >= 0.9
    assert task_map["accuracy"] >= native["accuracy"] - 0.05  # two templates per class: the map carries them over
    assert results["similarity"]["linear_cka"] < 0.99  # two different models (one model on both sides gives 1)
    assert "## Task-supervised map (paper Table 1)" in (out / "results.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 0
    models = results["models"]
    assert (models["source"]["spec"], models["source"]["dim"]) == SOURCE
    assert (models["target"]["spec"], models["target"]["dim"]) == TARGET
    affine, meta = load_map(out / "maps" / "task_map", source=models["source"]["fingerprint"],
                            target=models["target"]["fingerprint"], source_dim=SOURCE[1], target_dim=TARGET[1])
    assert meta["setting"] == "task_map" and meta["method"] == "ridge" and meta["lambda"] > 0
    assert np.shape(affine.W) == (SOURCE[1], TARGET[1]) and np.shape(affine.b) == (TARGET[1],)
    # The recorded map quality, recomputed from each model's cached test features: source @ W + b ≈ target.
    n_test = results["data"]["task"]["n_test"]
    source_test = _cached(tmp_path / "cache", models["source"]["fingerprint"], n_test)
    target_test = _cached(tmp_path / "cache", models["target"]["fingerprint"], n_test)
    recorded = results["settings"]["task_map"]["per_seed"][0]["map"]
    assert recorded["r2"] > 0.2
    assert map_metrics(np.asarray(apply_map(affine, source_test)), target_test)["r2"] == pytest.approx(
        recorded["r2"], abs=1e-5)

    # A failed run into the same folder (40 shots per class > 25 train rows of class "opinion"; caught before any
    # model loads) leaves the previous run's folder exactly as it was.
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    failed = _run(tmp_path, "--per_class_shots", "--shots=40")
    assert failed.returncode == 2
    assert "40 shots per class requested, but the train split has only 25 rows of class 'opinion'" in failed.stderr
    assert "loading" not in failed.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_non_finite_optax_hyperparameters_fail_before_any_output(tmp_path):
    _write(tmp_path)
    done = _run(tmp_path, "--map=optax", "--optax_lr=nan")
    assert done.returncode == 2
    assert "learning_rate must be a finite number" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def _cached(cache: Path, model_fingerprint: str, rows: int) -> np.ndarray:
    """The one feature-cache entry of this model with `rows` rows (the task test split; other sets differ in size)."""
    metas = {entry: json.loads(entry.read_text()) for entry in cache.glob("*.json")}
    found = [np.load(entry.with_suffix(".npy")) for entry, meta in metas.items()
             if meta["key"]["model_fingerprint"] == model_fingerprint and meta["shape"][0] == rows]
    assert len(found) == 1, f"{len(found)} cache entries of {rows} rows for {model_fingerprint[:12]}"
    return found[0]
