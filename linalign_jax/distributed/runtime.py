"""JAX's multi-process runtime and exact cross-process collectives on host data.

One code path serves one CPU, one GPU, many local devices and many hosts: every binary calls `initialize()` (a no-op
in a single process; `cli.initialize_distributed()` reads its arguments from flags), builds a mesh (`mesh.py`) and
lets `jax.jit` + `NamedSharding` place the work. There is no launcher of our own: processes are started by SLURM, a
TPU pod's `--worker=all`, or by hand with explicit flags.

Host-side gathers (`process_stack`, `process_allgather_rows`) gather the raw bytes of every process's array and
combine them in process order on the host. That keeps float64 statistics float64 whether or not `jax_enable_x64` is on,
and gives every process bit-identical results that do not depend on the device count.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from linalign_jax.errors import LinalignError

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


# ----------------------------------------------------------------------------------------------------------- runtime

def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = "auto") -> bool:
    """Start JAX's distributed runtime when this is a multi-process job; return whether it is one.

    Explicit arguments win, then the env vars JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. With none
    of them, `mode="auto"` initialises (letting JAX detect the cluster) only when the environment shows several tasks,
    so a plain single-process run never waits for a coordinator. Must run before anything touches a JAX device.
    """
    if mode not in MODES:
        raise LinalignError(f"distributed mode {mode!r} is not one of {MODES}")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _int_or_env(num_processes, "JAX_NUM_PROCESSES")
    process_id = _int_or_env(process_id, "JAX_PROCESS_ID")
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if mode == "off":
        return False
    if all(v is not None for v in given.values()):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise LinalignError(f"process_id={process_id}, num_processes={num_processes}: expected "
                                f"num_processes >= 1 and 0 <= process_id < num_processes")
        if num_processes == 1:
            return False
    elif mode == "auto":
        if any(v is not None for v in given.values()):
            missing = sorted(k for k, v in given.items() if v is None)
            raise LinalignError(f"multi-process run needs all of coordinator_address, num_processes and process_id; "
                                f"missing {missing} (set the flags, the JAX_* env vars, or --distributed=on)")
        cluster = detected_cluster()
        if cluster is None:
            return False
        log.info("%s job detected, initialising jax.distributed", cluster)
    _use_cpu_collectives()
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def detected_cluster() -> str | None:
    """Name of the multi-task launcher visible in the environment (SLURM, Open MPI, TPU pod), else None.

    SLURM counts only inside an `srun` step (SLURM_PROCID set): a plain `python` in an `salloc` shell is one process.
    """
    env = os.environ
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU pod"
    return None


def _int_or_env(value: int | None, env: str) -> int | None:
    if value is not None:
        return int(value)
    raw = os.environ.get(env)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise LinalignError(f"env {env}={raw!r} is not an integer") from None


def _use_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend need gloo (jax 0.6 defaults to none); harmless on GPU/TPU."""
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def barrier(name: str) -> None:
    """Block until every process reaches the barrier with the same name (no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------------- host-side data

def process_slice(n: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """The contiguous rows [start, stop) of n that this process owns; sizes differ by at most one row."""
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if n < 0 or not 0 <= p < count:
        raise LinalignError(f"process_slice(n={n}) for process {p} of {count}")
    base, extra = divmod(n, count)
    start = p * base + min(p, extra)
    return slice(start, start + base + (p < extra))


def process_allgather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows (process order) on every process; row counts may differ; bits are exact."""
    local = np.ascontiguousarray(local)
    if jax.process_count() == 1:
        return local
    counts = _allgather_bytes(np.array([local.shape[0]], np.int64)).reshape(-1)
    width = max(int(counts.max()), 1)
    padded = np.zeros((width,) + local.shape[1:], local.dtype)
    padded[:local.shape[0]] = local
    stacked = _allgather_bytes(padded)
    return np.concatenate([stacked[i, :c] for i, c in enumerate(counts)], axis=0)


def to_host(array: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array, as numpy on every process."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def process_stack(tree: Any) -> Any:
    """Stack each leaf of a pytree of host arrays over processes -> [process_count, *shape], exact in any dtype.

    Leaves must have equal shapes and dtypes on all processes. Used to merge per-process statistics in process order,
    so every process computes the same bits.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if jax.process_count() == 1:
        stacked = [np.asarray(leaf)[None] for leaf in leaves]
    else:
        stacked = [_allgather_bytes(np.asarray(leaf)) for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, stacked)


def _allgather_bytes(arr: np.ndarray) -> np.ndarray:
    """Stack `arr` from every process -> [process_count, *arr.shape], moving raw bytes so no dtype is narrowed.

    Words are uint32 when the size allows (jax without x64 would turn float64/int64 into 32-bit values) and bytes
    otherwise.
    """
    arr = np.asarray(arr, order="C")  # not ascontiguousarray: it turns 0-d leaves into shape (1,)
    raw = arr.reshape(-1).view(np.uint8)
    word = np.uint32 if raw.size % 4 == 0 else np.uint8
    # Every process must send the same shape; a size mismatch would surface as an XLA error, so check it by name.
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    if len(set(sizes.reshape(-1).tolist())) != 1:
        raise LinalignError(f"allgather: processes hold different sizes {sizes.reshape(-1).tolist()} bytes")
    gathered = np.asarray(multihost_utils.process_allgather(raw.view(word)))
    return np.ascontiguousarray(gathered).view(np.uint8).view(arr.dtype).reshape((-1,) + arr.shape)
