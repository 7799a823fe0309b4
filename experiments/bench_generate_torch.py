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

import numpy as np
import torch
import transformers

from torch_side import build, setup, timed, versions  # next to this script (run as a file, not a module)


def main(spec: dict) -> dict:
    dtype, device = setup(spec)
    model = build(spec, dtype, device, transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM)
    ids = torch.from_numpy(np.load(spec["ids"]).astype(np.int64)).to(device)
    mask = torch.from_numpy(np.load(spec["mask"]).astype(np.int64)).to(device)
    n = spec["new_tokens"]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def run():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=pad)

    out, wall, cpu = timed(run, device, spec["warmup"], spec["repeats"])
    return {"seconds": wall, "cpu_seconds": cpu, "new_ids": out[:, ids.shape[1]:].cpu().numpy().tolist(),
            **versions(device)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
