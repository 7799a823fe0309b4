"""Extract pooled hidden-state features of one model over one dataset split into a .npy file (+ metadata .json).

    python -m experiments.extract --model=all-MiniLM-L6-v2 --data=trec --split=test --pooling=mean \
        --max_length=128 --out=/tmp/minilm_trec_test.npy

--model: asset name, hub id, HF directory or .gguf file (anything `load_model` takes, so models outside the registry
work too). --data: a labelled dataset spec (`load_dataset`; --split picks train or test) or an unlabelled one
(`public`, a .txt file: `load_texts`, --split is ignored). Goes through the feature cache unless --nocache.
Writes FILE.npy (float32 [N, d], row i = text i) and FILE.json (model and data fingerprints, settings, truncated
count, timing), both atomically.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from linalign_jax.errors import LinalignError, exit_on_bad_input

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "model spec: asset name, hub id, HF directory or .gguf file")
flags.DEFINE_string("data", None, "dataset spec: registry name, local file/directory or hub id")
flags.DEFINE_enum("split", "test", ["train", "test"], "split of a labelled dataset")
flags.DEFINE_enum("pooling", "mean", ["mean", "last", "cls"], "how token states become one vector per text")
flags.DEFINE_integer("layer", -1, "-1: final hidden state (after the final norm); i: hidden_states[i]")
flags.DEFINE_integer("max_length", 128, "tokens per text; longer texts are truncated and counted")
flags.DEFINE_integer("batch_size", 64, "texts per forward pass")
flags.DEFINE_bool("normalize", False, "L2-normalise each feature vector")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter / compute dtype")
flags.DEFINE_integer("limit", 0, "keep the first N texts (0 = all)")
flags.DEFINE_bool("cache", True, "read / write the feature cache ($LINALIGN_CACHE/features)")
flags.DEFINE_string("out", None, "output .npy path; metadata goes next to it as .json")
flags.mark_flags_as_required(["model", "data", "out"])

UNLABELLED_SPECS = ("public",)


def load_split_texts(spec: str, split: str, limit: int) -> list:
    from linalign_jax.data import load_dataset, load_texts

    if spec in UNLABELLED_SPECS or Path(spec).suffix.lower() == ".txt":
        texts = load_texts(spec)
    else:
        texts = list(load_dataset(spec)[split]["text"])
    return texts[:limit] if limit > 0 else texts


def run(command: str) -> dict:
    from linalign_jax import features
    from linalign_jax.data import fingerprint
    from linalign_jax.io_utils import atomic_path, atomic_write_json
    from linalign_jax.models import load_model

    out = Path(FLAGS.out)
    if out.suffix != ".npy":
        raise LinalignError(f"--out must end in .npy, got {str(out)!r}")
    if FLAGS.limit < 0:
        raise LinalignError(f"--limit must be >= 0, got {FLAGS.limit}")
    texts = load_split_texts(FLAGS.data, FLAGS.split, FLAGS.limit)
    model = load_model(FLAGS.model, dtype=FLAGS.dtype)
    settings = dict(pooling=FLAGS.pooling, layer=FLAGS.layer, max_length=FLAGS.max_length, normalize=FLAGS.normalize,
                    batch_size=FLAGS.batch_size)
    data_fingerprint = fingerprint(texts)
    if FLAGS.cache:
        result = features.cached_features(model, texts, data_fingerprint, **settings)
    else:
        result = features.extract_features(model, texts, **settings)
    with atomic_path(out) as tmp:
        np.save(tmp, result.array, allow_pickle=False)
    metadata = {**result.metadata, "command": command, "data_spec": FLAGS.data, "split": FLAGS.split,
                "data_fingerprint": data_fingerprint, "shape": list(result.array.shape)}
    atomic_write_json(out.with_suffix(".json"), metadata)
    return metadata


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    command = "python -m experiments.extract " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    start = time.perf_counter()
    with exit_on_bad_input():
        meta = run(command)
    print(f"wrote {FLAGS.out} {tuple(meta['shape'])}: {meta['truncated']} of {meta['n_texts']} texts truncated at "
          f"{meta['max_length']} tokens; cache {meta.get('cache', 'off')}; {time.perf_counter() - start:.1f}s in all",
          file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
