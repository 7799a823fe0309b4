"""Run by test_decoders.py in a subprocess with 4 CPU devices: the qwen3_moe case with its experts split over the
mesh's "model" axis (one expert per device) must still match transformers. Prints one JSON line."""
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from linalign_jax import distributed  # noqa: E402
from linalign_jax.models import load_model  # noqa: E402
from tests.models import test_decoders as cases  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    model = load_model(str(cases.materialize("qwen3_moe", "causal", Path(tmp))))
expected = np.load(cases.FAMILIES / "qwen3_moe" / "expected.npz")
placed = distributed.shard_params(model.params, distributed.local_mesh(jax.device_count()))
kernel = placed["layers"]["mlp"]["experts_gate_proj"]
ids, mask = (jnp.asarray(expected[f"left_{k}"], jnp.int32) for k in ("input_ids", "attention_mask"))
real = expected["left_attention_mask"].astype(bool)
hidden = np.asarray(model.forward(placed, ids, mask).last_hidden_state)
print(json.dumps({"devices": jax.device_count(), "expert_shard": list(kernel.addressable_shards[0].data.shape),
                  "error": float(np.abs(hidden[real] - expected["left_last_hidden_state"][real]).max())}))
