"""Data glue shared by the HELIX binaries (no flags of its own, so any binary can import it): each party embeds its
texts with its own model through the feature cache, and test rows are subsampled the way `experiments.align` does."""
from __future__ import annotations

import sys
from typing import Mapping, Sequence

import numpy as np


def embed(spec: str, texts: Sequence[str], cfg: Mapping) -> np.ndarray:
    """Pooled features [N, d] of `texts` under model `spec`; cfg has pooling, normalize, max_length, batch_size, dtype."""
    from linalign_jax.data import fingerprint
    from linalign_jax.features import cached_features
    from linalign_jax.models import load_model

    print(f"loading {spec}", file=sys.stderr, flush=True)
    model = load_model(spec, dtype=cfg["dtype"])
    return cached_features(model, list(texts), fingerprint(list(texts)), pooling=cfg["pooling"],
                           max_length=cfg["max_length"], normalize=cfg["normalize"],
                           batch_size=cfg["batch_size"]).array


EMBED_FLAGS = ("pooling", "normalize", "max_length", "batch_size", "dtype")


def embed_with_flags(flag_values, texts: Sequence[str], missing_model: str) -> np.ndarray:
    """`embed` with the binary's --model and extraction flags; `missing_model` says why --model is needed."""
    from linalign_jax.errors import LinalignError

    if not flag_values.model:
        raise LinalignError(f"--model is required {missing_model}")
    return embed(flag_values.model, texts, {k: getattr(flag_values, k) for k in EMBED_FLAGS})


def subsample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified subsample of `limit` rows (all rows when limit is 0 or ≥ N)."""
    from linalign_jax.data.splits import stratified_split

    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    return np.sort(stratified_split(labels, limit, seed)[1])


def launch_provider(flags: Mapping[str, object], port_file, *, timeout_s: float = 600.0, omp_threads: int = 1,
                    **popen):
    """Start `experiments.helix_provider` with `--name=value` flags and `omp_threads` OpenMP threads; wait until it
    writes `port_file`.

    Returns (process, "127.0.0.1:port"). Raises if it exits or stays silent for `timeout_s` (and kills it then).
    """
    import json
    import os
    import subprocess
    import time
    from pathlib import Path

    from linalign_jax.errors import LinalignError

    port_file = Path(port_file)
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "experiments.helix_provider", "--host=127.0.0.1", f"--port_file={port_file}",
           *(f"--{k}={v}" for k, v in flags.items())]
    env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads)}
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1], **popen)
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise LinalignError(f"provider {' '.join(cmd)} exited with status {proc.returncode} or did not start "
                                f"within {timeout_s:.0f} s")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
