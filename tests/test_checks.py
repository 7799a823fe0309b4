"""Inputs checked before any model loads, honest warnings, and output folders that are never half old, half new."""
import logging

import numpy as np
import pytest

from linalign_jax import reports
from linalign_jax.align.ridge import fit_ridge
from linalign_jax.data.checks import check_knn, check_limits, check_task
from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import Progress, check_outside, staged_dir
from linalign_jax.similarity import similarity_matrices

NAMES = ["neg", "pos"]


@pytest.mark.parametrize("call, message", [
    (lambda: check_limits(train_limit=0, test_limit=-5), r"--test_limit=-5: a row limit must be >= 0 \(0 = all"),
    (lambda: check_task("one.csv", [0] * 48, [0] * 12, NAMES),
     r"one.csv: the train split has 1 class \('neg'\) in 48 rows; a classifier needs at least 2 "
     r"\(is --label_column=label the label column\?\)"),
    (lambda: check_task("t.csv", [0, 1] * 24, [], NAMES), r"t.csv: evaluation needs at least 1 rows, got 0"),
    (lambda: check_task("t.csv", [0, 1] * 24, [0, 1], NAMES, shots=[32, 64]),
     r"t.csv: 64 shots requested, but the train split has 48 rows; lower --shots below 48"),
    (lambda: check_task("t.csv", [0] * 40 + [1] * 8, [0, 1], NAMES, shots=[16], per_class_shots=True),
     r"16 shots per class requested, but the train split has only 8 rows of class 'pos' .*'neg': 40"),
    (lambda: check_knn(10, 9, "(task test rows)", "lower --knn_k or raise --test_limit"),
     r"mutual kNN needs 1 <= k < N: --knn_k=10 with N=9 \(task test rows\); lower --knn_k"),
])
def test_bad_inputs_are_named_with_their_fix(call, message):
    with pytest.raises(LinalignError, match=message):
        call()


def test_good_inputs_pass():
    check_limits(train_limit=0, test_limit=5)
    check_task("t.csv", [0, 1] * 24, [0, 1], NAMES, shots=[4, 47])
    check_task("t.csv", [0, 1] * 24, [0, 1], NAMES, shots=[24], per_class_shots=True)
    check_knn(8, 9, "", "")


def test_gcv_warns_when_fit_rows_do_not_exceed_dims(caplog):
    """48 rows for 384 dims (issue 16: λ collapsed to 1e-9 without a word): the warning says by how much."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 384))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x @ rng.normal(size=(384, 384)) * 0.1 + 0.5 * rng.normal(size=(48, 384))
    with caplog.at_level(logging.WARNING):
        _, info = fit_ridge(x.astype(np.float32), y.astype(np.float32))
    assert info["lambda"] < 1e-8
    assert "48 fit rows for 384 source dims (GCV needs more rows than dims)" in info["lambda_warning"]
    assert "(1e-08 × the mean eigenvalue)" in info["lambda_warning"]
    assert "λ was clamped at the grid's lower bound" in info["lambda_warning"]
    assert info["lambda_warning"] in caplog.text
    x = rng.normal(size=(600, 16)).astype(np.float32)
    _, info = fit_ridge(x, (x @ rng.normal(size=(16, 4)) + rng.normal(size=(600, 4))).astype(np.float32))
    assert "lambda_warning" not in info


def test_a_failed_run_leaves_the_old_folder_untouched(tmp_path):
    out = tmp_path / "run"
    with staged_dir(out) as staging:
        (staging / "results.json").write_text("old")
        (staging / "maps").mkdir()
    with pytest.raises(RuntimeError):
        with staged_dir(out) as staging:
            (staging / "results.json").write_text("new, half written")
            raise RuntimeError("interrupted")
    assert (out / "results.json").read_text() == "old" and (out / "maps").is_dir()
    with staged_dir(out) as staging:
        (staging / "results.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # nothing of the old run is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left behind
    with pytest.raises(LinalignError, match=r"--feature_cache=.*lies inside --out_dir=.*replaces whole"):
        check_outside(out, feature_cache=str(out / "cache"))
    check_outside(out, feature_cache=str(tmp_path / "cache"), map_dir="")


def test_progress_logs_its_last_line_once(caplog):
    caplog.set_level(logging.INFO, logger="linalign_jax.io_utils")
    bar = Progress("runs", total=2, every=0.0)
    bar.update()
    bar.update()
    bar.close()
    assert [line.split(" (")[0] for line in caplog.messages] == ["runs: 1/2", "runs: 2/2"]
    caplog.clear()
    bar = Progress("slow", total=1, every=1e9)
    bar.update()
    bar.close()
    assert [line.split(" (")[0] for line in caplog.messages] == ["slow: 1/1"]


def test_reports_rough_edges():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 6))
    mats = similarity_matrices({"a": a, "b": a + 0.1 * rng.normal(size=a.shape)}, ["mutual_knn"], knn_k=3)
    assert np.isnan(np.diag(mats["mutual_knn_z"])).all() and np.isfinite(mats["mutual_knn_z"][0, 1])
    table = reports.similarity_markdown(mats, ["a", "b"], "cmd")
    z_rows = table.split("## mutual_knn_z")[1].splitlines()
    assert z_rows[4].startswith("| a | – |") and z_rows[5].endswith("| – |")
    results = {"models": {"source": {"spec": "S"}, "target": {"spec": "T"}}, "config": {"task_data": "trec",
                                                                                         "map": "procrustes"}}
    assert reports.accuracy_title(results) == "S → T on trec, procrustes map"
