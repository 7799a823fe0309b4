"""Scale-out on JAX's own distributed runtime: one code path for one CPU, one GPU, many devices and many hosts.

    runtime   initialize() from flags/env (no-op in one process), global_mesh()/local_mesh() with axes
              ("data", "model"), process_slice(), barrier(), exact host gathers
    sharding  parameter sharding by regex rules with an FSDP fallback over "model"; host rows -> global arrays
    extract   each process extracts its slice; per-process shards + one manifest (imported on demand)
    fit       ridge statistics and optax map training reduced over every process (imported on demand)
"""
from linalign_jax.distributed.runtime import (DATA_AXIS, MODEL_AXIS, barrier, define_flags, detected_cluster,
                                              global_mesh, initialize, initialize_from_flags, local_mesh,
                                              process_allgather_rows, process_slice, process_stack,
                                              to_host)
from linalign_jax.distributed.sharding import (FSDP_MIN_SIZE, TRANSFORMER_RULES, host_local_to_global,
                                               param_path, partition_specs, shard_params)

__all__ = [
    "DATA_AXIS", "MODEL_AXIS", "barrier", "define_flags", "detected_cluster", "global_mesh", "initialize",
    "initialize_from_flags", "local_mesh", "process_allgather_rows", "process_slice", "process_stack", "to_host",
    "FSDP_MIN_SIZE", "TRANSFORMER_RULES", "host_local_to_global", "param_path", "partition_specs", "shard_params",
]
