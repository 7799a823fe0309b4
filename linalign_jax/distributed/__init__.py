"""The parallel runtime, a leaf every stage builds on (it imports nothing of linalign_jax but `errors`): one code path
for one CPU, one GPU, many devices and many hosts.

    runtime   initialize() (no-op in one process), process_slice(), barrier(), exact host gathers
    mesh      THE ("data", "model") mesh: global_mesh() / local_mesh() / data_mesh(), row shardings, row padding
    sharding  parameter sharding by regex rules with an FSDP fallback over "model"; host rows -> global arrays

The multi-process wrappers live with the stage they serve: `linalign_jax.feature_shards` (each process extracts its
slice, shards + manifest) and `linalign_jax.align.distributed` (ridge / optax fits reduced over every process).
"""
from linalign_jax.distributed.mesh import (DATA_AXIS, MODEL_AXIS, data_mesh, data_size, global_mesh, local_mesh,
                                           pad_rows, replicated, round_up, row_sharding)
from linalign_jax.distributed.runtime import (MODES, barrier, detected_cluster, initialize, process_allgather_rows,
                                              process_slice, process_stack, to_host)
from linalign_jax.distributed.sharding import (FSDP_MIN_SIZE, TRANSFORMER_RULES, host_local_to_global,
                                               param_path, partition_specs, shard_params)

__all__ = [
    "DATA_AXIS", "MODEL_AXIS", "data_mesh", "data_size", "global_mesh", "local_mesh", "pad_rows", "replicated",
    "round_up", "row_sharding",
    "MODES", "barrier", "detected_cluster", "initialize", "process_allgather_rows", "process_slice", "process_stack",
    "to_host",
    "FSDP_MIN_SIZE", "TRANSFORMER_RULES", "host_local_to_global", "param_path", "partition_specs", "shard_params",
]
