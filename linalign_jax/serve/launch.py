"""Start a provider process (`python -m experiments.helix_provider`) on localhost and wait until it serves: for the
one-machine demo, the benchmarks, the fuzzer and the tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from linalign_jax.errors import LinalignError

REPO = Path(__file__).resolve().parents[2]


def launch_provider(flags: Mapping[str, object], port_file: str | os.PathLike, *, timeout_s: float = 600.0,
                    omp_threads: int = 1, **popen) -> tuple[subprocess.Popen, str]:
    """Start the provider with `--name=value` flags and `omp_threads` OpenMP threads; wait until it writes
    `port_file`. Returns (process, "127.0.0.1:port"). Raises if it exits or stays silent for `timeout_s` (and kills
    it then)."""
    port_file = Path(port_file)
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "experiments.helix_provider", "--host=127.0.0.1", f"--port_file={port_file}",
           *(f"--{k}={v}" for k, v in flags.items())]
    env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads)}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, **popen)
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise LinalignError(f"provider {' '.join(cmd)} exited with status {proc.returncode} or did not start "
                                f"within {timeout_s:.0f} s")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
