"""Row (data-parallel) placement for the fitting code on the project's ("data", "model") mesh."""
from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from linalign_jax.distributed.runtime import DATA_AXIS, local_mesh


def data_mesh(mesh: Mesh | None = None) -> Mesh:
    """The given mesh, or this process's devices on the "data" axis (fits reduce per process, then across)."""
    if mesh is None:
        return local_mesh()
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} lack the {DATA_AXIS!r} axis")
    return mesh


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def row_sharding(mesh: Mesh, ndim: int = 2, axis: int = 0) -> NamedSharding:
    """Shard dimension `axis` of an ndim-array over the data axis, replicate the rest."""
    spec = [None] * ndim
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
