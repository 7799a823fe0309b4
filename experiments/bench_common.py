"""Pieces every benchmark binary shares; flags only through `define_torch_side_flags` (defines nothing on import)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path


# Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json), as LlamaConfig fields.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def llama_decoder_config(hf: dict, dtype: str):
    """The `core.DecoderConfig` of a LlamaConfig-fields dict (random-weight benchmark models)."""
    from linalign_jax.models import core

    return core.DecoderConfig(
        family="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], head_dim=hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
        norm_eps=hf["rms_norm_eps"], rope=core.RopeConfig(theta=hf["rope_theta"]),
        tie_embeddings=hf["tie_word_embeddings"], dtype=dtype)


def random_params(config, seed: int = 0, scale: float = 0.02):
    """Random weights in the config's dtype, made leaf by leaf on the device (no float32 copy of the whole model:
    an 8B model would need 32 GB more); norm scales are ones."""
    import jax
    import jax.numpy as jnp

    from linalign_jax.models import core

    shapes = jax.eval_shape(lambda key: core.init_params(config, key), jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if getattr(path[-1], "key", None) == "scale":
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            out.append(jax.jit(lambda k, s=leaf.shape, d=leaf.dtype: (jax.random.normal(k, s, jnp.float32) * scale)
                               .astype(d))(jax.random.fold_in(key, i)))
    return jax.tree_util.tree_unflatten(treedef, out)


def restrict_cpu_threads(threads: int) -> None:
    """Make XLA's CPU backend use `threads` threads; must run before JAX creates its backend."""
    extra = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()


def torch_interpreter(explicit: str = "") -> str:
    """A Python with torch + transformers for the PyTorch side: `explicit`, else this interpreter when it has torch
    (the GPU image), else the oracle venv next to the package; '' when there is none."""
    import importlib.util
    import sys

    if explicit:
        return explicit
    if importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None:
        return sys.executable
    oracle = Path(__file__).resolve().parents[1] / ".venv-oracle" / "bin" / "python"
    return str(oracle) if oracle.exists() else ""


def define_torch_side_flags() -> None:
    """--threads and --torch_python of a benchmark with a PyTorch side (bench_extract, bench_generate)."""
    from absl import flags

    flags.DEFINE_integer("threads", 1, "CPU threads for each side (0 = leave both libraries' defaults)")
    flags.DEFINE_string("torch_python", "", "interpreter with torch + transformers ('' = this one if it has torch, "
                        "else .venv-oracle; none: the torch side is skipped)")


def run_torch_side(script: str, spec: dict, python: str, threads: int) -> dict:
    """The PyTorch side `script` (a file next to this one, e.g. bench_extract_torch.py) run by `python` on `spec`,
    offline, with `threads` OpenMP threads (0: torch's default); its last stdout line, as JSON."""
    from linalign_jax.errors import LinalignError

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})}
    done = subprocess.run([python, str(Path(__file__).with_name(script)), json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise LinalignError(f"torch side failed ({python}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def hf_directory(spec: str) -> Path:
    """The HF directory load_model reads for `spec` (a GGUF file's materialised copy), for the torch side."""
    from linalign_jax.assets import resolve_model
    from linalign_jax.models import gguf

    path = Path(spec).expanduser()
    path = path if path.exists() else Path(resolve_model(spec))
    return gguf.materialize(path) if gguf.is_gguf(path) else path


def measured_peak_tflops(dtype: str, n: int = 0, repeats: int = 5) -> float:
    """Best of `repeats` plain n x n @ n x n products in `dtype` on JAX's default device (after one compile);
    n = 0: 8192 on a GPU, 2048 elsewhere."""
    import jax
    import jax.numpy as jnp

    n = n or (8192 if jax.default_backend() == "gpu" else 2048)
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e12


def timed(run, repeats: int) -> dict:
    """Wall and process-CPU seconds of `repeats` calls of run(); medians too (robust to load spikes)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"seconds": wall, "cpu_seconds": cpu, "median_seconds": statistics.median(wall),
            "median_cpu_seconds": statistics.median(cpu)}


def load_average() -> float:
    """The 1-minute load average (benchmarks on a shared machine report it next to every rate)."""
    return os.getloadavg()[0]
