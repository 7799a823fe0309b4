"""The texts of one alignment experiment (task train/test with labels, OOD texts, public corpus), subsampled and
checked in one pass before any model is loaded: what `experiments.align` (and any binary evaluating a task) embeds.

    load_task_texts("trec", ood_data="rt-sentiment", public_data="public", test_limit=500, shots=[32, 64])
    -> {"train": (texts, labels), "test": (texts, labels), "classes": [...], "ood": texts | None,
        "public": texts | None}
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from linalign_jax.data import checks
from linalign_jax.data.loaders import LABEL, TEXT, load_dataset, load_texts
from linalign_jax.data.splits import stratified_subsample


def load_task_texts(task_data: str, *, ood_data: str = "", public_data: str = "", train_limit: int = 0,
                    test_limit: int = 0, ood_limit: int = 0, public_limit: int = 0, seed: int = 0,
                    text_column: str = TEXT, label_column: str = LABEL, shots: Sequence[int] = (),
                    per_class_shots: bool = False, knn_k: Optional[int] = None) -> dict:
    """Limits are row counts (0 = all; stratified for labelled splits, the first rows of the public corpus).
    `shots` are the shot counts the run will draw from the train split; `knn_k` the mutual-kNN k over the test
    rows (None = not computed). '' for ood_data / public_data = not used."""
    checks.check_limits(train_limit=train_limit, test_limit=test_limit, ood_limit=ood_limit,
                        public_limit=public_limit)
    columns = {"text_column": text_column, "label_column": label_column}
    task = load_dataset(task_data, seed=seed, **columns)
    out = {"classes": task["train"].features["label"].names}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        texts, labels = task[split]["text"], np.asarray(task[split]["label"])
        keep = stratified_subsample(labels, limit, seed)
        out[split] = ([texts[i] for i in keep], labels[keep])
    checks.check_task(task_data, out["train"][1], out["test"][1], out["classes"], shots=shots,
                      per_class_shots=per_class_shots, label_column=label_column)
    if knn_k is not None:
        checks.check_knn(knn_k, len(out["test"][1]), "(the task's test rows, for source-target similarity)",
                         "lower --knn_k or raise --test_limit")
    out["ood"] = None
    if ood_data:
        ood = load_dataset(ood_data, seed=seed, **columns)["test"]
        keep = stratified_subsample(np.asarray(ood["label"]), ood_limit, seed)
        out["ood"] = [ood["text"][i] for i in keep]
    out["public"] = load_texts(public_data, limit=public_limit or None, seed=seed, text_column=text_column) \
        if public_data else None
    return out


def load_rows(spec: str, split: str = "all", *, seed: int = 0, text_column: str = TEXT,
              label_column: str = LABEL) -> dict:
    """Every row of one split of a dataset, in source order, with what points back at the source:
    {"texts", "rows" (source row of each text), "labels" (None for unlabelled text), "classes", "split"}.

    split "all" is every row (train then test for a source with its own test file); "train" / "test" are the seeded
    split of `load_dataset`. Unlabelled sources (`public`, .txt, a table without `label_column`) have no split:
    `split` must be "all" there, and "split" in the result is None.
    """
    from pathlib import Path

    from linalign_jax.data.loaders import UNLABELED, load_text_rows
    from linalign_jax.data.local import read_table
    from linalign_jax.errors import LinalignError

    if split not in ("all", "train", "test"):
        raise LinalignError(f"split must be all, train or test, got {split!r}")
    path = Path(spec).expanduser()
    plain_text = spec in UNLABELED or (path.is_file() and path.suffix.lower() == ".txt")
    no_labels = not plain_text and path.is_file() and label_column not in read_table(path, None)
    if plain_text or no_labels:
        if split != "all":
            why = f"no {label_column!r} column" if no_labels else "plain text"
            raise LinalignError(f"{spec} has no labels ({why}), so no train/test split: use --split=all, or name "
                                "its label column with --label_column")
        texts, rows = load_text_rows(spec, seed=seed, text_column=text_column)
        return {"texts": texts, "rows": np.asarray(rows, np.int64), "labels": None, "classes": None, "split": None}
    data = load_dataset(spec, seed=seed, text_column=text_column, label_column=label_column)
    parts = [data[s][:] for s in (("train", "test") if split == "all" else (split,))]
    rows = np.concatenate([np.asarray(p["row"], np.int64) for p in parts])
    order = np.argsort(rows, kind="stable") if split == "all" else np.arange(len(rows))
    texts = [t for p in parts for t in p["text"]]
    labels = np.concatenate([np.asarray(p["label"], np.int64) for p in parts])
    return {"texts": [texts[i] for i in order], "rows": rows[order], "labels": labels[order],
            "classes": data["train"].features["label"].names, "split": split}
