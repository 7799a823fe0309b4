import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from linalign_jax.errors import LinalignError
from linalign_jax.evaluate.layers import layer_alignment, layer_similarity, matched_depth

TINY_BERT = Path(__file__).resolve().parents[1] / "fixtures" / "encoders" / "bert_tiny"


def test_matched_depth_pairs_relative_depths():
    assert matched_depth(7, 13) == [(0, 0), (1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]
    assert matched_depth(13, 7)[-1] == (12, 6) and matched_depth(1, 5) == [(0, 0)]


def test_layer_alignment_finds_the_layer_that_is_a_linear_image():
    rng = np.random.default_rng(0)
    n, labels = 240, np.repeat(np.arange(3), 80)
    base = rng.normal(size=(n, 6)) + 2.0 * np.eye(3)[labels] @ rng.normal(size=(3, 6))
    source = np.stack([rng.normal(size=(n, 6)), base])                            # layer 1 carries the signal
    target = np.stack([rng.normal(size=(n, 5)), rng.normal(size=(n, 5)), base @ rng.normal(size=(6, 5))])
    train, test = np.arange(0, n, 2), np.arange(1, n, 2)
    out = layer_alignment(source[:, train], target[:, train], labels[train], source[:, test], target[:, test],
                          labels[test], 3, jax.random.key(0))
    assert out["map_r2"].shape == (2, 3) and out["native_accuracy"].shape == (3,)
    assert out["map_r2"][1, 2] > 0.95 and np.nanmax(np.delete(out["map_r2"].ravel(), 5)) < 0.2
    assert out["accuracy_final_head"][1, 2] > 0.9 and out["accuracy_final_head"][0, 2] < 0.6
    # R² of pair (1, 2) from the closed form with the chosen λ, written out
    xs, ys = source[1, train], target[2, train]
    xc, yc = xs - xs.mean(0), ys - ys.mean(0)
    W = np.linalg.solve(xc.T @ xc + out["lambda"][1, 2] * np.eye(6), xc.T @ yc)
    pred = (source[1, test] - xs.mean(0)) @ W + ys.mean(0)
    truth = target[2, test]
    assert out["map_r2"][1, 2] == pytest.approx(1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum(),
                                                abs=1e-5)
    sims = layer_similarity(source[:, test], target[:, test], ["linear_cka"])
    assert sims["linear_cka"].shape == (2, 3) and np.argmax(sims["linear_cka"]) == 5
    with pytest.raises(LinalignError, match="layer='all'"):
        layer_similarity(source[0], target[0], ["linear_cka"])


def test_layer_sweep_binary_on_tiny_bert(tmp_path):
    rows = [(f"What is {w}?", "q") for w in "abcdefghijklmnopqrst"] + \
           [(f"I liked {w} a lot.", "o") for w in "abcdefghijklmnopqrst"]
    (tmp_path / "task.csv").write_text("text,label\n" + "\n".join(f'"{t}",{l}' for t, l in rows) + "\n")
    cmd = [sys.executable, "-m", "experiments.layer_sweep", f"--source_model={TINY_BERT}",
           f"--target_model={TINY_BERT}", f"--task_data={tmp_path / 'task.csv'}", "--train_limit=0", "--test_limit=0",
           "--measures=linear_cka,cknna", "--knn_k=3", "--n_permutations=3", "--max_length=16",
           f"--feature_cache={tmp_path / 'cache'}", f"--out_dir={tmp_path / 'out'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "layer_sweep.json").read_text())
    states = result["models"]["source"]["hidden_states"]
    cka = np.asarray(result["similarity"]["linear_cka"])
    assert cka.shape == (states, states)
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-4)  # the same model on both sides
    assert len(result["matched_depth"]) == states
    assert (tmp_path / "out" / "heatmap_map_r2.png").stat().st_size > 0
