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
from the per-process rows (`linalign_jax.align.distributed`) and process 0 writes it to DIR/map (map.safetensors +
map.json). DIR must be on a filesystem every process sees.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
from absl import flags

from linalign_jax import cli, distributed

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS
cli.define_model_flags("source_model", "target_model")
cli.define_data_flags("data")
cli.define_extraction_flags()
cli.define_distributed_flags()
flags.DEFINE_enum("map", "ridge", ["ridge", "optax"], "map method")
cli.define_ridge_flag()
flags.DEFINE_integer("seed", 0, "PRNG seed of the optax map")
flags.DEFINE_string("out_dir", None, "output directory, shared by all processes")
flags.mark_flags_as_required(["source_model", "target_model", "data", "out_dir"])


def run() -> dict:
    from linalign_jax.align import distributed as fit
    from linalign_jax.align.maps import save_map
    from linalign_jax.align.optax_map import OptaxMapConfig
    from linalign_jax.align.ridge import parse_lambda
    from linalign_jax.data import checks, fingerprint, load_texts
    from linalign_jax.feature_shards import extract_to_shards
    from linalign_jax.models import load_model

    checks.check_limits(limit=FLAGS.limit)  # every input before a model loads
    lam = parse_lambda(FLAGS.ridge_lambda)
    out_dir = Path(FLAGS.out_dir)
    texts = load_texts(FLAGS.data, limit=FLAGS.limit or None, seed=FLAGS.data_seed, text_column=FLAGS.text_column)
    checks.check_rows(FLAGS.data, len(texts), max(2, jax.process_count()), "a map fit (at least one row per "
                      "process)", "raise --limit or give more texts")
    data_fingerprint = fingerprint(texts)
    options = cli.extraction_options()
    mesh = distributed.local_mesh(FLAGS.model_axis_size)
    rows, models = {}, {}
    for side, spec in (("source", FLAGS.source_model), ("target", FLAGS.target_model)):
        model = load_model(spec, dtype=FLAGS.dtype)
        _, rows[side] = extract_to_shards(model, texts, out_dir / "features" / side,
                                          data_fingerprint=data_fingerprint, mesh=mesh, **options.cache_kwargs(model))
        models[side] = {"spec": spec, "fingerprint": model.fingerprint}
        del model
    if FLAGS.map == "ridge":
        affine, info = fit.fit_ridge(rows["source"], rows["target"], lam)
    else:
        affine, info = fit.fit_optax_map(rows["source"], rows["target"], jax.random.PRNGKey(FLAGS.seed),
                                         OptaxMapConfig())
    metadata = {"source_model": models["source"]["spec"], "target_model": models["target"]["spec"],
                "source_fingerprint": models["source"]["fingerprint"],
                "target_fingerprint": models["target"]["fingerprint"], "pooling": options.pooling,
                "normalize": options.normalize, "max_length": options.max_length, "data_spec": FLAGS.data, "data_fingerprint": data_fingerprint,
                "n_texts": len(texts), "processes": jax.process_count(), "devices": jax.device_count(),
                **{k: v for k, v in info.items() if k not in ("history", "lambda_grid", "gcv")}}
    if jax.process_index() == 0:
        save_map(out_dir / "map", affine, metadata)
    distributed.barrier("scale_out:map")
    return metadata


def main(argv):
    start = time.perf_counter()
    cli.initialize_distributed()
    meta = run()
    if jax.process_index() == 0:
        log.info(f"wrote {Path(FLAGS.out_dir) / 'map'}: {meta['method']} map {meta['source_model']} -> "
                 f"{meta['target_model']} from {meta['n_texts']} texts on {meta['processes']} processes / "
                 f"{meta['devices']} devices in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli.run(main)
