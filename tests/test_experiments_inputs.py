"""The binaries on precomputed embeddings files instead of models (no model loads, so these stay fast): a whole
`experiments.align` run end to end, and bad input that must fail before any model or file is touched."""
import csv
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from linalign_jax.data.task import load_task_texts
from linalign_jax.errors import LinalignError
from linalign_jax.precomputed import write_embeddings

TOPICS = ["Paris", "rivers", "the moon", "chess", "volcanoes", "jazz", "bread", "glaciers", "tigers", "painting",
          "trains", "coffee"]
TEMPLATES = {"question": ["What do you know about {}?", "Where can I learn about {}?"],
             "opinion": ["I really loved the film about {}.", "That story about {} was boring."]}


def bag_of_words(text: str, dim: int, salt: str) -> np.ndarray:
    """A stand-in 'model': hashed word counts (two salts/dims = two models whose spaces are linearly related)."""
    v = np.zeros(dim, np.float32)
    for word in text.lower().replace("?", "").replace(".", "").split():
        v[int(hashlib.sha256((salt + word).encode()).hexdigest(), 16) % dim] += 1.0
    return v


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rows = [(t.format(topic), label) for label, ts in TEMPLATES.items() for t in ts for topic in TOPICS]
    with open(root / "task.csv", "w", newline="") as f:
        csv.writer(f).writerows([("sentence", "kind")] + rows)
    with open(root / "one_class.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label")] + [(t, "question") for t, _ in rows])
    public = [f"A note on {topic}, number {i}." for i in range(6) for topic in TOPICS]
    (root / "public.txt").write_text("\n".join(public) + "\n")
    texts = [t for t, _ in rows] + public
    for name, dim, salt in (("source", 24, "b"), ("target", 32, "a")):
        write_embeddings(root / f"{name}.parquet", texts, np.stack([bag_of_words(t, dim, salt) for t in texts]),
                         f"bag-of-words-{name}")
    return root


def _align(files, out, *extra):
    cmd = [sys.executable, "-m", "experiments.align", f"--source_model={files / 'source.parquet'}",
           f"--target_model={files / 'target.parquet'}", f"--task_data={files / 'task.csv'}",
           "--text_column=sentence", "--label_column=kind", f"--public_data={files / 'public.txt'}",
           "--shots=8", "--seeds=0", "--knn_k=5", f"--out_dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_align_end_to_end_on_embeddings_files(files, tmp_path):
    done = _align(files, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["models"]["source"]["family"] == results["models"]["target"]["family"] == "precomputed"
    assert (results["models"]["source"]["dim"], results["models"]["target"]["dim"]) == (24, 32)
    assert results["data"]["task"]["classes"] == ["opinion", "question"]
    assert results["settings"]["native"]["mean"]["accuracy"] >= 0.9
    assert results["settings"]["task_map"]["mean"]["accuracy"] >= 0.9
    assert results["similarity"]["mutual_knn"] > 0 and results["config"]["knn_k"] == 5
    assert json.loads((tmp_path / "out" / "maps" / "task_map" / "map.json").read_text())["source_model"] == \
        str(files / "source.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


@pytest.mark.parametrize("kwargs, message", [
    (dict(task_data="{root}/one_class.csv", text_column="text", label_column="label"),
     r"one_class.csv: the train split has 1 class \('question'\) in 38 rows; a classifier needs at least 2"),
    (dict(test_limit=-5), r"--test_limit=-5: a row limit must be >= 0 \(0 = all rows\)"),
    (dict(shots=[8, 64]), r"64 shots requested, but the train split has 38 rows; lower --shots below 38"),
    (dict(knn_k=10), r"mutual kNN needs 1 <= k < N: --knn_k=10 with N=10 \(the task's test rows"),
    (dict(label_column="label"), r"no 'label' column; columns found: 'sentence', 'kind'"),
])
def test_task_inputs_are_checked_in_one_pass(files, kwargs, message):
    """What `experiments.align` loads and checks before any model (`data.task.load_task_texts`)."""
    args = dict(task_data=str(files / "task.csv"), public_data=str(files / "public.txt"), text_column="sentence",
                label_column="kind", knn_k=5)
    args.update({k: v.format(root=files) if isinstance(v, str) else v for k, v in kwargs.items()})
    with pytest.raises(LinalignError, match=message):
        load_task_texts(args.pop("task_data"), **args)


def test_align_fails_before_loading_anything(files, tmp_path):
    """One bad value through the binary: one `error:` line, exit 2, no model loaded, no folder written."""
    failed = _align(files, tmp_path / "out", f"--task_data={files / 'one_class.csv'}", "--text_column=text",
                    "--label_column=label")
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "error: " + str(files / "one_class.csv") + ": the train split has 1 class" in failed.stderr
    assert "loading" not in failed.stderr and not (tmp_path / "out").exists()


def _extract(*args):
    return subprocess.run([sys.executable, "-m", "experiments.extract", *args], capture_output=True, text=True,
                          timeout=600)


def test_extract_writes_every_row_with_labels_and_source_rows(files, tmp_path):
    """A 16-row CSV gives 16 rows by default (not a silent 20% test split), each pointing back at its line."""
    with open(files / "task.csv") as f:
        rows = list(csv.reader(f))[1:17]
    with open(tmp_path / "small.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label")] + rows)
    out = tmp_path / "x" / "feats.npy"
    done = _extract(f"--model={files / 'target.parquet'}", f"--data={tmp_path / 'small.csv'}", f"--out={out}",
                    "--nonormalize")  # the raw vectors (the shared extraction default L2-normalises)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "small.csv: 16 rows (split all)" in done.stderr
    vectors, source_rows, labels = (np.load(out.with_name(f"feats{k}.npy")) for k in ("", ".rows", ".labels"))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert vectors.shape == (16, 32) and source_rows.tolist() == list(range(16))
    assert [meta["classes"][i] for i in labels] == [label for _, label in rows] and meta["split"] == "all"
    np.testing.assert_allclose(vectors[3], bag_of_words(rows[3][0], 32, "a"))
    # the same path, now from a .txt: no labels (the stale labels file goes), no "split" in the metadata
    (tmp_path / "lines.txt").write_text("".join(t + "\n" for t, _ in rows[:5]))
    done = _extract(f"--model={files / 'target.parquet'}", f"--data={tmp_path / 'lines.txt'}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert "split" not in meta and meta["shape"] == [5, 32] and meta["files"] == ["feats.npy", "feats.rows.npy"]
    assert not out.with_name("feats.labels.npy").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["feats.json", "feats.npy", "feats.rows.npy"]
    failed = _extract(f"--model={files / 'target.parquet'}", f"--data={tmp_path / 'lines.txt'}", "--split=test",
                      f"--out={out}")
    assert failed.returncode == 2 and "lines.txt has no labels (plain text), so no train/test split" in failed.stderr
    assert json.loads(out.with_suffix(".json").read_text()) == meta  # the earlier set is untouched


def test_similarity_on_embeddings_files(files, tmp_path):
    out = tmp_path / "sim"
    (out / "maps").mkdir(parents=True)  # debris of an older run: a finished run replaces the folder whole
    cmd = [sys.executable, "-m", "experiments.similarity", f"--models={files / 'source.parquet'},"
           f"{files / 'target.parquet'}", f"--data={files / 'public.txt'}", "--limit=40", "--knn_k=5",
           "--measures=linear_cka,mutual_knn", f"--out_dir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "similarity.json").read_text())
    assert result["config"]["knn_k"] == 5 and result["data"]["n"] == 40
    assert np.isnan(result["matrices"]["mutual_knn_z"][0][0])
    assert "| " + str(files / "source.parquet") + " | – |" in (out / "similarity.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["heatmap_linear_cka.png", "heatmap_mutual_knn.png",
                                                     "similarity.json", "similarity.md"]
    assert done.stderr.count("similarity pairs: 3/3") == 1  # the last progress line once
    failed = subprocess.run(cmd[:-3] + ["--knn_k=40", f"--out_dir={out}"], capture_output=True, text=True,
                            timeout=600)
    assert failed.returncode == 2
    assert "mutual kNN needs 1 <= k < N: --knn_k=40 with N=40" in failed.stderr and "loading" not in failed.stderr
    assert json.loads((out / "similarity.json").read_text()) == result


def test_generate_refuses_a_map_inside_the_folder_it_replaces(tmp_path):
    (tmp_path / "run" / "maps" / "a").mkdir(parents=True)
    failed = subprocess.run([sys.executable, "-m", "experiments.generate", "--source_model=SmolLM2-135M-Instruct",
                             "--target_model=gemma-3-270m", f"--map_dir={tmp_path / 'run' / 'maps' / 'a'}",
                             f"--out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2
    assert "lies inside --out_dir=" in failed.stderr and "replaces whole" in failed.stderr
    assert (tmp_path / "run" / "maps" / "a").is_dir()


def test_helix_input_bound_is_the_next_power_of_two_and_finite_on_zeros():
    pytest.importorskip("openfhe")
    from linalign_jax.helix.encoding import input_bound

    assert input_bound(np.array([[0.3, -0.7]])) == 1.0 and input_bound(np.array([[1.5]])) == 2.0
    assert input_bound(np.array([[-4.0, 4.0]])) == 4.0  # already a power of two: not doubled
    assert input_bound(np.zeros((2, 3))) == 2.0 ** -39  # an all-zero batch: the floor, not 2^-inf
