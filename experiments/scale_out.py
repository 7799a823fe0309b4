"""Fit a source -> target map with every process of a job: sharded extraction of both models, then a ridge or optax
map reduced across all processes and devices. The same command runs on one CPU, one GPU node, a SLURM cluster or a
TPU pod slice (see README "Scale-out").

    python -m experiments.scale_out --source_model=SPEC --target_model=SPEC --data=SPEC --out_dir=DIR \
        [--map=ridge|optax] [--ridge_lambda=auto] [--pooling=mean] [--max_length=128] [--batch_size=64] \
        [--dtype=bfloat16] [--model_axis_size=1] [--limit=0] \
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I | --distributed=on]

--data: unlabelled texts as `linalign_jax.data.load_texts` reads them (`public`, a .txt file, a table with a text
column, or the train split of a dataset spec). Each process extracts its contiguous slice of the texts on its own
devices (weights split over --model_axis_size of them, batches over the rest) through the feature cache, and writes
DIR/features/{source,target}/shard-*.npy; process 0 adds manifest.json once every shard exists. The map is fitted
from the per-process rows (`linalign_jax.distributed.fit`) and process 0 writes it to DIR/map (map.safetensors +
map.json). DIR must be on a filesystem every process sees.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
from absl import app, flags

from linalign_jax import distributed
from linalign_jax.errors import LinalignError, exit_on_bad_input

FLAGS = flags.FLAGS
flags.DEFINE_string("source_model", None, "source model spec (asset name, hub id, HF directory or .gguf file)")
flags.DEFINE_string("target_model", None, "target model spec: the map predicts its features")
flags.DEFINE_string("data", None, "texts to fit on: public, a .txt file, a table or a dataset spec (train split)")
flags.DEFINE_integer("limit", 0, "keep the first N texts (0 = all)")
flags.DEFINE_enum("map", "ridge", ["ridge", "optax"], "map method")
flags.DEFINE_string("ridge_lambda", "auto", "ridge λ (> 0) or 'auto' (GCV)")
flags.DEFINE_integer("seed", 0, "PRNG seed of the optax map")
flags.DEFINE_enum("pooling", "mean", ["mean", "last", "cls"], "how token states become one vector per text")
flags.DEFINE_integer("max_length", 128, "tokens per text; longer texts are truncated and counted")
flags.DEFINE_integer("batch_size", 64, "texts per forward pass per process")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "model compute dtype")
flags.DEFINE_integer("model_axis_size", 1, "devices per process that split each model's weights (FSDP); the "
                     "rest split the batch")
flags.DEFINE_string("feature_cache", None, "feature cache directory (default $LINALIGN_CACHE/features)")
flags.DEFINE_string("out_dir", None, "output directory, shared by all processes")
flags.mark_flags_as_required(["source_model", "target_model", "data", "out_dir"])
distributed.define_flags()


def run() -> dict:
    from linalign_jax.align.maps import save_map
    from linalign_jax.align.optax_map import OptaxMapConfig
    from linalign_jax.align.ridge import parse_lambda
    from linalign_jax.data import fingerprint, load_texts
    from linalign_jax.distributed import extract, fit
    from linalign_jax.models import load_model

    if FLAGS.limit < 0:
        raise LinalignError(f"--limit must be >= 0, got {FLAGS.limit}")
    lam = parse_lambda(FLAGS.ridge_lambda)
    out_dir = Path(FLAGS.out_dir)
    texts = load_texts(FLAGS.data, limit=FLAGS.limit or None)
    data_fingerprint = fingerprint(texts)
    settings = dict(pooling=FLAGS.pooling, max_length=FLAGS.max_length, batch_size=FLAGS.batch_size,
                    mesh=distributed.local_mesh(FLAGS.model_axis_size))
    rows, models = {}, {}
    for side, spec in (("source", FLAGS.source_model), ("target", FLAGS.target_model)):
        model = load_model(spec, dtype=FLAGS.dtype)
        _, rows[side] = extract.extract_to_shards(model, texts, out_dir / "features" / side,
                                                  data_fingerprint=data_fingerprint, cache_dir=FLAGS.feature_cache,
                                                  **settings)
        models[side] = {"spec": spec, "fingerprint": model.fingerprint}
        del model
    if FLAGS.map == "ridge":
        affine, info = fit.fit_ridge(rows["source"], rows["target"], lam)
    else:
        affine, info = fit.fit_optax_map(rows["source"], rows["target"], jax.random.PRNGKey(FLAGS.seed),
                                         OptaxMapConfig())
    metadata = {"source_model": models["source"]["spec"], "target_model": models["target"]["spec"],
                "source_fingerprint": models["source"]["fingerprint"],
                "target_fingerprint": models["target"]["fingerprint"], "pooling": FLAGS.pooling,
                "max_length": FLAGS.max_length, "data_spec": FLAGS.data, "data_fingerprint": data_fingerprint,
                "n_texts": len(texts), "processes": jax.process_count(), "devices": jax.device_count(),
                **{k: v for k, v in info.items() if k not in ("history", "lambda_grid", "gcv")}}
    if jax.process_index() == 0:
        save_map(out_dir / "map", affine, metadata)
    distributed.barrier("scale_out:map")
    return metadata


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    with exit_on_bad_input():
        distributed.initialize_from_flags()
        meta = run()
    if jax.process_index() == 0:
        print(f"wrote {Path(FLAGS.out_dir) / 'map'}: {meta['method']} map {meta['source_model']} -> "
              f"{meta['target_model']} from {meta['n_texts']} texts on {meta['processes']} processes / "
              f"{meta['devices']} devices in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
