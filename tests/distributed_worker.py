"""One process of the scale-out test (tests/test_distributed.py): run every distributed stage, save what it computed.

    python tests/distributed_worker.py --out=DIR [--coordinator_address=H:P --num_processes=N --process_id=I]

The device count comes from XLA_FLAGS (set by the test). Every process computes; process 0 writes DIR/result.npz.
`run_stages` is also called in the test process itself (one process, one device) to produce the reference.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

from linalign_jax import cli, distributed, feature_shards as extract  # noqa: E402
from linalign_jax.align import distributed as fit  # noqa: E402
from linalign_jax.align.optax_map import OptaxMapConfig  # noqa: E402
from linalign_jax.errors import LinalignError  # noqa: E402
from linalign_jax.models import load_model  # noqa: E402

N_ROWS, DX, DY = 90, 16, 12         # 90 rows: uneven slices over 4 devices / 2 processes
OPTAX = OptaxMapConfig(batch_size=16, max_epochs=3, patience=10, learning_rate=1e-2)
TINY_BERT = REPO / "tests" / "fixtures" / "encoders" / "bert_tiny"
TEXTS = ["the movie was good", "what is the capital city", "a man is playing guitar on the stage",
         "bad film", "the stock market fell", "who played music in the city", "it was great", "how",
         "the answer to the question was in the film"]  # 9 texts: uneven slices, several length buckets


def paired_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Source rows with a large common offset (exercises the shifted statistics) and a noisy affine target."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(N_ROWS, DX)) + 5.0).astype(np.float32)
    y = (x @ rng.normal(size=(DX, DY)) + 0.1 * rng.normal(size=(N_ROWS, DY))).astype(np.float32)
    return x, y


def sharded_matmul(model_axis_size: int) -> dict[str, np.ndarray]:
    """A weight FSDP-sharded over "model" times rows sharded over "data": the 70B-model layout, in miniature."""
    rng = np.random.default_rng(1)
    params = {"layers_0": {"mlp": {"up_proj": {"kernel": rng.normal(size=(DX, 64)).astype(np.float32)}}},
              "final_norm": {"scale": np.ones(DX, np.float32)}}
    mesh = distributed.global_mesh(model_axis_size)
    placed = distributed.shard_params(params, mesh)
    rows = distributed.process_slice(8 * mesh.shape["data"])
    x_all = rng.normal(size=(8 * mesh.shape["data"], DX)).astype(np.float32)
    x = distributed.host_local_to_global(x_all[rows], mesh)
    out = jax.jit(lambda p, x: (x * p["final_norm"]["scale"]) @ p["layers_0"]["mlp"]["up_proj"]["kernel"])(placed, x)
    try:  # rows that do not split over this process's "data" shards must be refused by name
        distributed.host_local_to_global(x_all[rows][:3], mesh)
        uneven = ""
    except LinalignError as e:
        uneven = str(e)
    kernel = placed["layers_0"]["mlp"]["up_proj"]["kernel"]
    shard_shape = np.array(kernel.addressable_shards[0].data.shape)
    return {"matmul": distributed.to_host(out), "matmul_expected": x_all @ params[
        "layers_0"]["mlp"]["up_proj"]["kernel"], "kernel_shard_shape": shard_shape,
        "specs": np.array(json.dumps(transformer_specs(mesh), sort_keys=True)), "uneven_rows_error": np.array(uneven)}


def transformer_specs(mesh) -> dict[str, str]:
    """The rules' choices for a layer-stacked decoder layout, an odd vocab, a norm and an unnamed big weight."""
    shapes = {"embed": {"embedding": (1025, 512)}, "lm_head": (16, 34),
              "layers": {"attn": {"q_proj": {"kernel": (2, 16, 32)}, "o_proj": {"kernel": (2, 32, 16)}},
                         "mlp_norm": {"scale": (2, 16)}}, "proj": {"kernel": (512, 1024)}}
    params = jax.tree_util.tree_map(lambda s: np.zeros(s, np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))
    specs = distributed.partition_specs(params, mesh)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0]
    return {distributed.param_path(path): str(tuple(spec)) for path, spec in flat}


def extraction(out_dir: Path, model_axis_size: int) -> dict[str, np.ndarray]:
    """Gathered features, with the weights split over "model" on this process's devices; and sharded ones written
    twice (the second run must come from the per-shard cache)."""
    model = load_model(str(TINY_BERT))
    settings = dict(pooling="mean", max_length=32, batch_size=4)
    settings["mesh"] = distributed.local_mesh(model_axis_size)
    gathered = extract.extract_gathered(model, TEXTS, **settings)
    shards = out_dir / "shards"
    for _ in range(2):
        manifest, _ = extract.extract_to_shards(model, TEXTS, shards, data_fingerprint="worker-texts",
                                                cache_dir=out_dir / "cache", **settings)
    cache_hits = [s["cache_hit"] for s in json.loads(manifest.read_text())["shards"]]
    return {"features_gathered": gathered, "features_sharded": extract.load_shards(shards),
            "shard_cache_hits": np.array(cache_hits)}


def run_stages(out_dir: Path, model_axis_size: int = 1) -> dict[str, np.ndarray]:
    x, y = paired_features()
    rows = distributed.process_slice(N_ROWS)
    ridge_map, ridge_info = fit.fit_ridge(x[rows], y[rows], lam=0.5, batch_size=32)
    optax_map, optax_info = fit.fit_optax_map(x[rows], y[rows], jax.random.PRNGKey(0), OPTAX)
    gathered = distributed.process_allgather_rows(np.arange(N_ROWS, dtype=np.float64)[rows] + 0.1)
    return {
        "ridge_W": np.asarray(ridge_map.W), "ridge_b": np.asarray(ridge_map.b),
        "ridge_n": np.array(ridge_info["n_rows"]),
        "optax_W": np.asarray(optax_map.W), "optax_b": np.asarray(optax_map.b),
        "optax_val_loss": np.array(optax_info["best_val_loss"]),
        "gathered_rows": gathered, "processes": np.array(jax.process_count()), "devices": np.array(jax.device_count()),
        **sharded_matmul(model_axis_size), **extraction(out_dir, model_axis_size),
    }


def main(argv):
    from absl import flags

    cli.initialize_distributed()
    results = run_stages(Path(flags.FLAGS.out), model_axis_size=flags.FLAGS.model_axis_size)
    distributed.barrier("worker-done")
    if jax.process_index() == 0:
        np.savez(Path(flags.FLAGS.out) / "result.npz", **results)


if __name__ == "__main__":
    from absl import app, flags

    cli.define_distributed_flags()  # includes --model_axis_size (of the sharded matmul and extraction here)
    flags.DEFINE_string("out", None, "Directory for result.npz.", required=True)
    app.run(main)
