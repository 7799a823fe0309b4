"""Placing parameters and host data on the ("data", "model") mesh.

Parameters are sharded by rules: an ordered list of (regex on the "/"-joined parameter path, PartitionSpec); the first
rule whose regex matches wins. Specs are right-aligned to the leaf's shape, so one rule fits a plain [d, f] kernel
and a layer-stacked (nn.scan) [L, d, f] one. A leaf no rule names, or whose rule does not divide its shape (a vocab of
30522 over 4 devices), falls back to FSDP: a large weight is split over "model" along its largest divisible axis, small
ones (norms, biases) are replicated. Activations are sharded over "data" by the caller, so a model too big for one
device (70B in bf16 = 140 GB) keeps 1/model_axis_size of its weights per device and XLA gathers each layer's weights
when it is used.
"""
from __future__ import annotations

import re
from typing import Any, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from linalign_jax.distributed.mesh import DATA_AXIS, MODEL_AXIS
from linalign_jax.errors import LinalignError

Rules = Sequence[Tuple[str, P]]

# Weights below this many elements are replicated by the FSDP fallback: gathering them costs more than storing them.
FSDP_MIN_SIZE = 1 << 18

# The project's transformer layouts (models/core.py decoders, bert/mpnet encoders): projections into the wide side are
# split by output, projections back by input, embeddings by vocab. Matched with re.search on the full path.
# Mixture-of-experts weights [E, in, out] are split by expert: each device holds whole experts.
TRANSFORMER_RULES: Rules = (
    (r"(^|/)experts_(gate|up|down)_proj$", P(MODEL_AXIS, None, None)),
    (r"(^|/)(embed|word_embeddings)/embedding$", P(MODEL_AXIS, None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value)/kernel$", P(None, MODEL_AXIS)),
    (r"(o_proj|down_proj|attention/out)/kernel$", P(MODEL_AXIS, None)),
    (r"(^|/)lm_head$", P(None, MODEL_AXIS)),
)


def param_path(path: Sequence[Any]) -> str:
    """"params/layers_0/attn/q_proj/kernel" from a jax.tree_util key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def partition_specs(params: Any, mesh: Mesh, rules: Rules = TRANSFORMER_RULES,
                    fsdp_min_size: int = FSDP_MIN_SIZE) -> Any:
    """Pytree of PartitionSpec for `params` (same structure), each valid for its leaf's shape on `mesh`."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    model_size = mesh.shape.get(MODEL_AXIS, 1)

    def spec_for(path, leaf):
        name = param_path(path)
        shape = tuple(np.shape(leaf))
        for regex, spec in compiled:
            if regex.search(name):
                aligned = _right_align(name, shape, spec, mesh)
                if aligned is not None:
                    return aligned
                break
        if model_size == 1 or len(shape) < 2 or int(np.prod(shape)) < fsdp_min_size:
            return P()
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % model_size == 0:
                return P(*[MODEL_AXIS if a == axis else None for a in range(len(shape))])
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, params)


def _right_align(name: str, shape: Tuple[int, ...], spec: P, mesh: Mesh) -> P | None:
    """`spec` padded with leading Nones to the leaf's rank; None when a named axis does not divide its dimension.

    Naming an axis the mesh lacks, or more axes than the leaf has, is a bug in the rules and raises.
    """
    if len(spec) > len(shape):
        raise LinalignError(f"sharding rule gives {name} (shape {shape}) the spec {spec} with too many axes")
    aligned = (None,) * (len(shape) - len(spec)) + tuple(spec)
    for dim, axes in zip(shape, aligned):
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            if axis not in mesh.shape:
                raise LinalignError(f"sharding rule for {name} names mesh axis {axis!r}; mesh has {tuple(mesh.shape)}")
            if dim % mesh.shape[axis]:
                return None
    return P(*aligned)


def shard_params(params: Any, mesh: Mesh, rules: Rules = TRANSFORMER_RULES,
                 fsdp_min_size: int = FSDP_MIN_SIZE) -> Any:
    """Place every leaf on `mesh` by `partition_specs`; each device receives only its own block.

    Leaves already placed that way come back unchanged, so sharding a model once and extracting many times costs one
    transfer. Host (numpy) leaves never pass through one device whole: that is how weights larger than a device load.
    Works across processes when every process holds the same host values (as after loading the same checkpoint).
    """
    specs = partition_specs(params, mesh, rules, fsdp_min_size)

    def place(leaf, spec):
        sharding = NamedSharding(mesh, spec)
        if isinstance(leaf, jax.Array):
            if leaf.sharding == sharding:  # already placed (a model sharded once, extracted many times)
                return leaf
            if leaf.is_fully_addressable and sharding.is_fully_addressable:
                return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)  # host weights (each device gets only its block), or a mesh spanning processes
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, params, specs)


def host_local_to_global(local: np.ndarray, mesh: Mesh, spec: P = P(DATA_AXIS)) -> jax.Array:
    """One global array from every process's block of rows (process order), sharded by `spec` (rows over "data").

    Each process must pass the same number of rows, divisible by its share of the "data" axis (see `mesh.pad_rows`).
    """
    local = np.asarray(local)
    if spec and spec[0] == DATA_AXIS:
        rows_of_data = np.moveaxis(mesh.devices, mesh.axis_names.index(DATA_AXIS), 0).reshape(mesh.shape[DATA_AXIS], -1)
        shards_here = sum(any(d.process_index == jax.process_index() for d in row) for row in rows_of_data)
        if local.shape[0] % shards_here:
            raise LinalignError(f"{local.shape[0]} local rows cannot be split over this process's {shards_here} "
                                f"'{DATA_AXIS}' shards; pad them to a multiple (mesh.pad_rows)")
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)
