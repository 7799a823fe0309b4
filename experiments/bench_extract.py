"""Extraction throughput: our jitted JAX forward + pooling vs PyTorch transformers, same model, batch, length and
token ids, in one run.

    python -m experiments.bench_extract --model=all-MiniLM-L6-v2 --batch=32 --length=128 --json_out=/tmp/minilm.json
    python -m experiments.bench_extract --model=SmolLM2-135M-Instruct --batch=8 --length=128
    python -m experiments.bench_extract --random_llama8b --dtype=bfloat16 --batch=16 --length=512   # GPU machine

The JAX side is exactly what `extract_features` runs per batch (`features.pooled_forward`: forward, pooling, rows
sharded over the local devices); tokenization is excluded on both sides. Each timed batch is timed alone (wall and
process CPU time) and rates come from the median batch, which a shared, loaded machine disturbs least; the JSON also
has every batch's times and the mean rate. The PyTorch side runs
experiments/bench_extract_torch.py in a subprocess, first (so the two never hold the GPU at once), with
--torch_python: the oracle venv (.venv-oracle) on CPU, this interpreter on the GPU machine. On CPU both sides get
--threads threads (XLA's CPU thread pool is restricted to match torch.set_num_threads).

--random_llama8b builds a Llama-3-8B-shaped model with random weights on both sides (32 layers, d=4096, 32 heads with
8 KV heads, FFN 14336, vocab 128256, RoPE θ=500000; --random_layers shrinks it for a smoke test) and needs no file.
FLOPs per batch = 2 · (Dense kernel parameters) · tokens + 4 · layers · batch · length² · attention width (QKᵀ and
AV; embeddings are lookups, and no LM head runs in extraction). MFU = achieved FLOP/s / nominal peak, with the
peak from --nominal_peak_tflops or, for bfloat16 on an H100/H200, 989 TFLOP/s (dense). The yardstick measured in
the same run: `peak_tflops`, the best of a few plain n × n matmuls (--peak_size) in the benchmark's dtype on the
same device and threads, by each library (JAX's is the top-level key, each side has its own), and
`fraction_of_peak` = achieved / that peak. Prints a markdown table last; --json_out gets every number.
"""
from __future__ import annotations

import json
import os
import logging
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from experiments.bench_common import (LLAMA3_8B, define_torch_side_flags, hf_directory, llama_decoder_config,
                                       measured_peak_tflops, restrict_cpu_threads, run_torch_side, torch_interpreter)
from linalign_jax import cli

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS
cli.define_model_flags("model", defaults={"model": "all-MiniLM-L6-v2"})  # the benchmark's default subject
flags.DEFINE_bool("random_llama8b", False, "benchmark a random-weight Llama-3-8B-shaped model instead of --model")
flags.DEFINE_integer("random_layers", 32, "layers of the --random_llama8b model (fewer: smoke test)")
flags.DEFINE_integer("batch", 16, "rows per forward pass")
flags.DEFINE_integer("length", 128, "tokens per row (all real tokens)")
flags.DEFINE_integer("n_batches", 5, "timed forward passes per side")
flags.DEFINE_integer("warmup", 2, "untimed passes first (JAX compiles in the first)")
define_torch_side_flags()
flags.DEFINE_bool("torch", True, "run the PyTorch side")
flags.DEFINE_float("nominal_peak_tflops", 0.0, "device peak for MFU (0 = auto: 989 for bfloat16 on H100/H200)")
flags.DEFINE_integer("peak_size", 0, "n of the n x n matmuls that measure the peak (0 = 2048 on CPU, 8192 on GPU)")
flags.DEFINE_string("json_out", "", "write all results here (JSON)")

DENSE_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0}
LOW_TOKEN_ID = 10  # random ids start above the special ids (MPNet derives positions from "id != pad")


def random_llama_config() -> dict:
    return {**LLAMA3_8B, "num_hidden_layers": FLAGS.random_layers}


def jax_model():
    """The LoadedModel the JAX side runs."""
    import functools

    import jax

    from linalign_jax.models import core, decoder_model, load_model

    if FLAGS.random_llama8b:
        config = llama_decoder_config(random_llama_config(), FLAGS.dtype)
        params = jax.jit(functools.partial(core.init_params, config))(jax.random.PRNGKey(0))
        return decoder_model(config, params, None, spec="random-llama3-8b-shape", fingerprint="random")
    return load_model(FLAGS.model, dtype=FLAGS.dtype)


def flops_per_batch(model, batch: int, length: int) -> float:
    import jax
    import numpy as np

    kernels = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]
                  if getattr(path[-1], "key", None) == "kernel")
    cfg = model.config
    layers = getattr(cfg, "num_layers", None) or cfg.num_hidden_layers
    width = cfg.num_heads * cfg.head_dim if hasattr(cfg, "head_dim") else cfg.hidden_size
    return 2.0 * kernels * batch * length + 4.0 * layers * batch * length ** 2 * width


def run_torch(ids_path: Path, model_dir, pooling: str) -> dict:
    python = torch_interpreter(FLAGS.torch_python) or sys.executable
    spec = {"model_dir": str(model_dir) if model_dir else None,
            "random_llama": random_llama_config() if FLAGS.random_llama8b else None,
            "ids": str(ids_path), "n_batches": FLAGS.n_batches, "warmup": FLAGS.warmup, "dtype": FLAGS.dtype,
            "threads": FLAGS.threads, "pooling": pooling, "peak_size": FLAGS.peak_size}
    return {**run_torch_side("bench_extract_torch.py", spec, python, FLAGS.threads), "python": python}


def run_jax(model, ids, pooling: str) -> dict:
    import jax
    import numpy as np

    from linalign_jax import features
    from linalign_jax.distributed import data_size, local_mesh, row_sharding, shard_params
    from linalign_jax.errors import LinalignError

    mesh = local_mesh()
    if ids.shape[0] % data_size(mesh):
        raise LinalignError(f"--batch={ids.shape[0]} must be a multiple of the {data_size(mesh)} local devices")
    rows = row_sharding(mesh)
    params = shard_params(model.params, mesh)
    ids_dev = jax.device_put(ids, rows)
    mask_dev = jax.device_put(np.ones_like(ids), rows)
    step = features.pooled_forward(model.forward_fn, pooling, -1, False)
    compile_start = time.perf_counter()
    for _ in range(FLAGS.warmup):
        pooled = step(params, ids_dev, mask_dev).block_until_ready()
    warmup_seconds = time.perf_counter() - compile_start
    wall, cpu = [], []
    for _ in range(FLAGS.n_batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(params, ids_dev, mask_dev).block_until_ready()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"batch_seconds": wall, "batch_cpu_seconds": cpu, "warmup_seconds": warmup_seconds,
            "pooled_head": np.asarray(pooled[:2], np.float32).tolist(), "jax": jax.__version__,
            "device": mesh.devices.flat[0].device_kind, "devices": int(mesh.devices.size)}


def summarize(side: dict, tokens: int, flops: float, peak) -> None:
    """Per-side rates from the median batch (robust to load spikes on a shared machine) and from the mean."""
    import numpy as np

    wall, cpu = np.median(side["batch_seconds"]), np.median(side["batch_cpu_seconds"])
    side.update(median_seconds=float(wall), median_cpu_seconds=float(cpu), tokens_per_second=tokens / wall,
                tokens_per_cpu_second=tokens / cpu, mean_tokens_per_second=tokens / np.mean(side["batch_seconds"]),
                tflops=flops / wall / 1e12)
    side["mfu"] = side["tflops"] / peak if peak else None
    side["fraction_of_peak"] = side["tflops"] / side["peak_tflops"]


def nominal_peak_tflops(device_kind: str):
    if FLAGS.nominal_peak_tflops > 0:
        return FLAGS.nominal_peak_tflops
    if FLAGS.dtype == "bfloat16":
        return next((peak for name, peak in DENSE_BF16_PEAK_TFLOPS.items() if name in device_kind), None)
    return None


def markdown(result: dict) -> str:
    lines = ["| impl | device | dtype | batch × length | tokens/s | s/batch | tokens/CPU-s | CPU s/batch | TFLOP/s | "
             "matmul peak TFLOP/s | of peak | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["sides"].items():
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "—"
        lines.append(f"| {name} | {row['device']} | {result['dtype']} | {result['batch']} × {result['length']} | "
                     f"{row['tokens_per_second']:,.0f} | {row['median_seconds']:.3f} | "
                     f"{row['tokens_per_cpu_second']:,.0f} | {row['median_cpu_seconds']:.3f} | {row['tflops']:.3f} | "
                     f"{row['peak_tflops']:.3f} | {row['fraction_of_peak']:.1%} | {mfu} |")
    if "speedup" in result:
        lines.append(f"\nJAX / PyTorch tokens/s: **{result['speedup']:.2f}×** ({result['model']}; "
                     f"by CPU time {result['speedup_cpu_time']:.2f}×; medians over {result['n_batches']} batches; "
                     f"max |Δ pooled| {result['pooled_max_abs_diff']}; load average {result['load_average']} on "
                     f"{result['cpu_count']} cores)")
    return "\n".join(lines)


def main(argv):
    if min(FLAGS.batch, FLAGS.length, FLAGS.n_batches, FLAGS.warmup) < 1:
        raise app.UsageError("--batch, --length, --n_batches and --warmup must be >= 1")
    if FLAGS.threads > 0:
        restrict_cpu_threads(FLAGS.threads)
    import numpy as np

    model_name = "random Llama-3-8B shape" if FLAGS.random_llama8b else FLAGS.model
    result = {"command": cli.command_line(),
              "model": model_name, "dtype": FLAGS.dtype, "batch": FLAGS.batch, "length": FLAGS.length,
              "n_batches": FLAGS.n_batches, "threads": FLAGS.threads,
              "load_average": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(), "sides": {}}
    model_dir, vocab, pooling = None, LLAMA3_8B["vocab_size"], "last"
    if not FLAGS.random_llama8b:
        model_dir = hf_directory(FLAGS.model)
        hf = json.loads((model_dir / "config.json").read_text())
        vocab, pooling = hf["vocab_size"], "mean" if hf["model_type"] in ("bert", "mpnet") else "last"
    ids = np.random.default_rng(0).integers(LOW_TOKEN_ID, vocab, (FLAGS.batch, FLAGS.length)).astype(np.int32)
    # The torch side runs before JAX touches the accelerator, so neither holds memory the other needs.
    if FLAGS.torch:
        log.info(f"torch side: {model_name}")
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "ids.npy", ids)
            result["sides"]["pytorch"] = run_torch(Path(tmp) / "ids.npy", model_dir, pooling)
    import jax

    log.info(f"jax side: {model_name}")
    model = jax_model()
    result["sides"]["jax"] = run_jax(model, ids, pooling)
    device_kind = jax.devices()[0].device_kind
    flops = flops_per_batch(model, FLAGS.batch, FLAGS.length)
    peak = nominal_peak_tflops(device_kind)
    result["sides"]["jax"]["peak_tflops"] = measured_peak_tflops(FLAGS.dtype, FLAGS.peak_size)
    result.update(backend=jax.default_backend(), device_kind=device_kind, flops_per_batch=flops,
                  nominal_peak_tflops=peak, peak_tflops=result["sides"]["jax"]["peak_tflops"],
                  pooling=pooling)
    for side in result["sides"].values():
        summarize(side, ids.size, flops, peak)
    if "pytorch" in result["sides"]:
        jax_side, torch_side = result["sides"]["jax"], result["sides"]["pytorch"]
        result["speedup"] = jax_side["tokens_per_second"] / torch_side["tokens_per_second"]
        result["speedup_cpu_time"] = jax_side["tokens_per_cpu_second"] / torch_side["tokens_per_cpu_second"]
        diff = np.abs(np.asarray(jax_side["pooled_head"]) - np.asarray(torch_side["pooled_head"])).max()
        # Random weights are drawn independently on each side: only a loaded checkpoint gives comparable outputs.
        result["pooled_max_abs_diff"] = None if FLAGS.random_llama8b else float(f"{diff:.3g}")
    if FLAGS.json_out:
        from linalign_jax.io_utils import atomic_write_json

        atomic_write_json(FLAGS.json_out, result)
    print(markdown(result))


if __name__ == "__main__":
    cli.run(main)
