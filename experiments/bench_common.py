"""Pieces every benchmark binary shares (no flags here: each binary defines its own)."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def restrict_cpu_threads(threads: int) -> None:
    """Make XLA's CPU backend use `threads` threads; must run before JAX creates its backend."""
    extra = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()


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
