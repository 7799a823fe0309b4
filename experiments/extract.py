"""Extract pooled hidden-state features of one model over a dataset into a .npy file, with labels, source row
indices and metadata beside it.

    python -m experiments.extract --model=all-MiniLM-L6-v2 --data=trec --split=test --pooling=mean \
        --max_length=128 --out=/tmp/minilm_trec_test.npy

--model: asset name, hub id, HF directory, .gguf file (anything `load_model` takes) or an embeddings file
(.parquet, `linalign_jax.precomputed`: its rows for these texts are written out). --data: a labelled dataset spec
(`load_dataset`) or unlabelled text (`public`, a .txt file, a table without a label column). --split=all (default)
takes every row in source order (for a source with its own test file: train rows, then test rows); train / test
take the seeded split of a labelled dataset. --limit keeps the first N of those rows; the row count is printed.
Goes through the feature cache unless --nocache. A .txt file is one text per line: a blank line is an error (as a
blank CSV cell is), so row i is always line i + 1.

Writes, replacing any earlier set only once all are complete (FILE.json last):
    FILE.npy         float32 [N, d], row i = text i
    FILE.rows.npy    int64 [N]: each text's row in the source (line number from 0 for .txt, record index for a table)
    FILE.labels.npy  int64 [N] class indices (labelled data only; feeds `helix_client --features/--labels`)
    FILE.json        model and data fingerprints, settings, classes, "split" (labelled data only), truncated count
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from absl import flags

from linalign_jax import cli
from linalign_jax.errors import LinalignError

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS
cli.define_model_flags("model")
cli.define_data_flags("data")
cli.define_extraction_flags()
flags.DEFINE_enum("split", "all", ["all", "train", "test"], "all rows, or the train / test split of a labelled "
                  "dataset")
flags.DEFINE_bool("cache", True, "read / write the feature cache (--feature_cache, default $LINALIGN_CACHE/features)")
flags.DEFINE_string("out", None, "output .npy path; rows, labels and metadata go next to it")
flags.mark_flags_as_required(["model", "data", "out"])

def run(command: str) -> dict:
    from linalign_jax.data import checks, fingerprint
    from linalign_jax.data.task import load_rows
    from linalign_jax.embedders import open_embedder
    from linalign_jax.io_utils import atomic_write_arrays

    out = Path(FLAGS.out)
    if out.suffix != ".npy":
        raise LinalignError(f"--out must end in .npy, got {str(out)!r}")
    checks.check_limits(limit=FLAGS.limit)
    data = load_rows(FLAGS.data, FLAGS.split, text_column=FLAGS.text_column, label_column=FLAGS.label_column)
    keep = slice(0, FLAGS.limit or None)
    texts, rows = data["texts"][keep], data["rows"][keep]
    kept = f"; --limit keeps the first {len(texts)}" if len(texts) < len(data["texts"]) else ""
    log.info(f"{FLAGS.data}: {len(data['texts'])} rows ({'split ' + data['split'] if data['split'] else 'unlabelled'})"
             f"{kept}")
    embedder = open_embedder(FLAGS.model, dtype=FLAGS.dtype)
    data_fingerprint = fingerprint(texts)
    result = embedder.features(texts, data_fingerprint, cache=FLAGS.cache, data=FLAGS.data,
                               **cli.extraction_options().cache_kwargs(embedder.model))

    def beside(kind: str) -> Path:  # FILE.npy -> FILE<kind>.npy
        return out.with_name(out.name[:-len(".npy")] + kind + ".npy")

    arrays = {"": result.array, ".rows": rows}
    if data["labels"] is not None:
        arrays[".labels"] = data["labels"][keep]
    metadata = {**result.metadata, "command": command, "data_spec": FLAGS.data, "data_fingerprint": data_fingerprint,
                "shape": list(result.array.shape), "model": embedder.info(),
                "files": [beside(kind).name for kind in arrays]}
    if data["split"]:
        metadata.update(split=data["split"], classes=data["classes"])
    atomic_write_arrays({beside(kind): array for kind, array in arrays.items()}, out.with_suffix(".json"), metadata,
                        stale=[beside(".labels")])
    return metadata


def main(argv):
    command = cli.command_line()
    start = time.perf_counter()
    meta = run(command)
    truncated = f"{meta['truncated']} of {meta['n_texts']} texts truncated at {meta['max_length']} tokens; " \
        if meta.get("max_length") else ""
    log.info(f"wrote {tuple(meta['shape'])} to {', '.join(meta['files'])} (+ .json): {truncated}cache "
             f"{meta.get('cache', 'off')}; {time.perf_counter() - start:.1f}s in all")


if __name__ == "__main__":
    cli.run(main)
