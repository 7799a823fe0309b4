"""THE device mesh ("data", "model") and row placement on it, for every stage (extraction, fitting, decoding).

Batches are sharded by rows over "data" (`row_sharding`), small arrays are `replicated`, and a batch whose row count
does not divide the "data" axis is zero-padded (`pad_rows`, with weights that mark the real rows) or sized up front
(`round_up`). Weights too big for one device are split over "model" by `sharding.shard_params`.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from linalign_jax.errors import LinalignError

DATA_AXIS = "data"
MODEL_AXIS = "model"


def global_mesh(model_axis_size: int = 1) -> Mesh:
    """Mesh ("data", "model") over every device of every process.

    Devices are ordered by (process, id), so each "model" group lies inside one process (fast links) whenever
    `model_axis_size` divides the local device count, and "data" spans processes. On TPU the physical topology picks
    the order instead.
    """
    return _mesh(jax.devices(), model_axis_size)


def local_mesh(model_axis_size: int = 1) -> Mesh:
    """Mesh ("data", "model") over this process's devices only: per-process work such as extracting one slice."""
    return _mesh(jax.local_devices(), model_axis_size)


def _mesh(devices: Sequence[Any], model_axis_size: int) -> Mesh:
    n = len(devices)
    if model_axis_size < 1 or n % model_axis_size:
        raise LinalignError(f"model_axis_size={model_axis_size} must be >= 1 and divide the device count {n}")
    shape = (n // model_axis_size, model_axis_size)
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        grid = np.array(sorted(devices, key=lambda d: (d.process_index, d.id)), dtype=object).reshape(shape)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def data_mesh(mesh: Mesh | None = None) -> Mesh:
    """The given mesh (checked for a "data" axis), or this process's devices: fits reduce per process, then across."""
    if mesh is None:
        return local_mesh()
    if DATA_AXIS not in mesh.axis_names:
        raise LinalignError(f"mesh axes {mesh.axis_names} lack the {DATA_AXIS!r} axis")
    return mesh


def data_size(mesh: Mesh) -> int:
    """How many row shards a batch is split into."""
    return mesh.shape[DATA_AXIS]


def row_sharding(mesh: Mesh, ndim: int = 2, axis: int = 0) -> NamedSharding:
    """Shard dimension `axis` of an ndim-array over the data axis, replicate the rest."""
    spec = [None] * ndim
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` >= n (a batch's row count that the "data" axis divides)."""
    return -(-n // multiple) * multiple


def pad_rows(x: np.ndarray, multiple: int) -> Tuple[np.ndarray, np.ndarray]:
    """Zero-pad rows of `x` up to a multiple; returns (padded, weights) with weight 1 for real rows and 0 for padding.

    `x` itself comes back when no padding is needed (no copy of a large batch).
    """
    n = x.shape[0]
    target = round_up(n, multiple)
    weights = np.zeros(target, np.float32)
    weights[:n] = 1.0
    if target == n:
        return x, weights
    padded = np.zeros((target,) + x.shape[1:], x.dtype)
    padded[:n] = x
    return padded, weights
