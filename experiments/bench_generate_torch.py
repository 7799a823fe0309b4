"""PyTorch side of experiments.bench_generate: time transformers' greedy `generate` on given left-padded token ids;
print one JSON line.

Run by bench_generate (and gpu_check) as a subprocess with an interpreter that has torch + transformers (the oracle
venv on CPU, the same interpreter on a GPU machine); it imports only torch, transformers and numpy. One argument: a
JSON object with
    model_dir      HF directory to load with AutoModelForCausalLM (or null with random_llama)
    random_llama   null or a dict of LlamaConfig fields: random weights built directly on the device
    ids, mask      .npy files of int32 [batch, length]: left-padded prompts and their attention mask
    new_tokens     tokens generated per row (EOS ignored: min_new_tokens = max_new_tokens)
    repeats, warmup, dtype ("float32" | "bfloat16"), threads (0: torch's default)
Output: {"seconds", "cpu_seconds" (wall and process CPU time of each timed `generate`), "new_ids" (the generated ids
of the last run, for a parity check), "torch", "transformers", "threads", "device"}.
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
        with torch.device(device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = transformers.LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def main(spec: dict) -> dict:
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(spec, dtype, device)
    ids = torch.from_numpy(np.load(spec["ids"]).astype(np.int64)).to(device)
    mask = torch.from_numpy(np.load(spec["mask"]).astype(np.int64)).to(device)
    n = spec["new_tokens"]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def run():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=pad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        for _ in range(spec["warmup"]):
            out = run()
        wall, cpu = [], []
        for _ in range(spec["repeats"]):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = run()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    return {"seconds": wall, "cpu_seconds": cpu, "new_ids": out[:, ids.shape[1]:].cpu().numpy().tolist(),
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
