"""What the PyTorch sides of the benchmarks share (bench_extract_torch, bench_generate_torch): the device and dtype
from the spec, the model built on the device, and the timing loop. Imports only torch and transformers: it runs in
the oracle venv (or the GPU image's interpreter), next to the scripts that import it by file location."""
import time

import torch
import transformers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def setup(spec: dict) -> tuple:
    """(dtype, device) of a spec: its dtype name; CUDA when torch sees one, else the CPU; spec["threads"] > 0 pins
    torch's CPU threads."""
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    return DTYPES[spec["dtype"]], torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(spec: dict, dtype, device, llama_class, auto_class):
    """spec["random_llama"] (LlamaConfig fields): random weights built directly on the device in the target dtype
    (no float32 detour on the host for an 8B shape); else `auto_class` from spec["model_dir"]."""
    if spec["random_llama"]:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**spec["random_llama"])
        with torch.device(device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = llama_class(config)
            finally:
                torch.set_default_dtype(previous)
    else:
        model = auto_class.from_pretrained(spec["model_dir"], dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def timed(step, device, warmup: int, repeats: int) -> tuple:
    """(last output, wall seconds, process CPU seconds) of `repeats` calls of `step` after `warmup` untimed ones,
    under inference mode; on CUDA each call ends with a synchronize, so the time covers the device work."""

    def synchronized():
        out = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    out, wall, cpu = None, [], []
    with torch.inference_mode():
        for _ in range(warmup):
            out = synchronized()
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = synchronized()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    return out, wall, cpu


def versions(device) -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
