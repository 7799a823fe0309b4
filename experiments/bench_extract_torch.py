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


def build(spec: dict, dtype, device):
    if spec["random_llama"]:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**spec["random_llama"])
        with torch.device(device):  # build on the device in the target dtype: no 32 GB float32 detour on the host
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = transformers.LlamaModel(config)
            finally:
                torch.set_default_dtype(previous)
    else:
        model = transformers.AutoModel.from_pretrained(spec["model_dir"], dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


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
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(spec, dtype, device)
    ids = torch.from_numpy(np.load(spec["ids"]).astype(np.int64)).to(device)
    mask = torch.ones_like(ids)

    def step():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = hidden.float().mean(1) if spec["pooling"] == "mean" else hidden[:, -1].float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return pooled

    with torch.inference_mode():
        for _ in range(spec["warmup"]):
            pooled = step()
        wall, cpu = [], []
        for _ in range(spec["n_batches"]):
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    return {"batch_seconds": wall, "batch_cpu_seconds": cpu, "peak_tflops": matmul_peak_tflops(spec, dtype, device),
            "pooled_head": pooled[:2].cpu().numpy().tolist(),
            "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
