"""PyTorch side of experiments.bench_extract: time transformers' forward on given token ids; print one JSON line.

Run by bench_extract as a subprocess with an interpreter that has torch + transformers (the oracle venv on CPU, the
same interpreter on the GPU machine); it imports only torch, transformers and numpy (no JAX, nothing of
linalign_jax). One argument: a JSON object with
    model_dir      HF directory to load with AutoModel (or null with random_llama)
    random_llama   null or a dict of LlamaConfig fields: random weights built directly on the device
    ids            .npy file of int32 token ids [batch, length] (the same ids the JAX side runs)
    n_batches, warmup, dtype ("float32" | "bfloat16"), threads (0: torch's default),
    pooling ("mean" | "last"), peak_size (n of the n x n matmuls timed for "peak_tflops"; 0: 2048 CPU, 8192 GPU)
The device is CUDA when torch sees one, else the CPU. Output: {"batch_seconds", "batch_cpu_seconds" (wall and
process CPU time of each timed batch), "peak_tflops" (best of 5 plain matmuls in the dtype), "pooled_head" (first rows' pooled features, for a parity check), "torch", "transformers", "device", "attn_implementation"}.
"""
import json
import sys
import time

import numpy as np
import torch
import transformers

from torch_side import build, setup, timed, versions  # next to this script (run as a file, not a module)


@torch.inference_mode()
def matmul_peak_tflops(spec: dict, dtype, device) -> float:
    n = spec.get("peak_size") or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e12


def main(spec: dict) -> dict:
    dtype, device = setup(spec)
    model = build(spec, dtype, device, transformers.LlamaModel, transformers.AutoModel)
    ids = torch.from_numpy(np.load(spec["ids"]).astype(np.int64)).to(device)
    mask = torch.ones_like(ids)

    def step():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.float().mean(1) if spec["pooling"] == "mean" else hidden[:, -1].float()

    pooled, wall, cpu = timed(step, device, spec["warmup"], spec["n_batches"])
    return {"batch_seconds": wall, "batch_cpu_seconds": cpu, "peak_tflops": matmul_peak_tflops(spec, dtype, device),
            "pooled_head": pooled[:2].cpu().numpy().tolist(), **versions(device),
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
