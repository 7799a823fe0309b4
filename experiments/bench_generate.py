"""Batched decode speed in one run: native JAX vs HF transformers `generate`, and hybrid vs native.

    python -m experiments.bench_generate --batch=8 --new_tokens=32 --json_out=runs/bench_generate.json

* native: `generate_batch(--model)` on --batch prompts at once, greedy, exactly --new_tokens tokens (EOS ignored);
* torch: transformers' `generate` on the same model directory, the same left-padded token ids and mask, greedy,
  `min_new_tokens = max_new_tokens` (run in --torch_python, the oracle venv on CPU; same thread count);
* hybrid: `HybridPair(--source_model body → --model head).generate_batch` on the same prompts (the map is read
  from --map_dir or fitted on --fit_texts public texts: speed does not need a good one).
Rates are generated tokens per second end to end (prefill included, as `generate` reports it), wall and CPU, median
of --repeats after one warm-up run that compiles every shape. Targets: native ≥ 1.0× torch, hybrid ≥ 0.5× native.
JSON keys: native_tokens_per_s, hybrid_tokens_per_s, torch_tokens_per_s, batch, ratios, the CPU-time rates,
token agreement of native vs torch, load averages and every timing. The markdown table is printed last.
"""
from __future__ import annotations

import platform
import statistics
import tempfile
from pathlib import Path

from absl import flags

from experiments.bench_common import (define_torch_side_flags, hf_directory, load_average, restrict_cpu_threads,
                                      run_torch_side, timed, torch_interpreter)
from linalign_jax import cli
from linalign_jax.errors import LinalignError

FLAGS = flags.FLAGS
# --model: the native model, the torch baseline and the hybrid's head; --source_model: the hybrid's body ('' skips it)
cli.define_model_flags("model", "source_model",
                       defaults={"model": "SmolLM2-135M-Instruct", "source_model": "gemma-3-270m"})
flags.DEFINE_string("map_dir", "", "a saved source → model map; '' fits one on --map_texts public texts")
flags.DEFINE_integer("map_texts", 100, "public texts for the map when --map_dir is empty")
flags.DEFINE_integer("batch", 8, "prompts decoded together")
flags.DEFINE_integer("new_tokens", 32, "tokens generated per prompt")
flags.DEFINE_integer("repeats", 3, "timed runs per side (median)")
define_torch_side_flags()
flags.DEFINE_string("json_out", "runs/bench_generate.json", "JSON output path")

PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,", "Water boils at",
           "A list of fruits: apple,", "In 1492, Columbus", "The best way to learn a new language is",
           "def fibonacci(n):", "My favourite colour is", "Photosynthesis is the process by which",
           "The three primary colours are")
NATIVE_VS_TORCH_TARGET, HYBRID_VS_NATIVE_TARGET = 1.0, 0.5


def prompts(batch: int) -> list:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def run_torch(model_dir: Path, ids, mask) -> dict:
    """The torch side in its own interpreter (bench_generate_torch.py), on exactly these ids."""
    import numpy as np

    python = torch_interpreter(FLAGS.torch_python)
    if not python:
        return {"skipped": "no interpreter with torch (--torch_python)"}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/ids.npy", ids)
        np.save(f"{tmp}/mask.npy", mask)
        spec = {"model_dir": str(model_dir), "random_llama": None, "ids": f"{tmp}/ids.npy", "mask": f"{tmp}/mask.npy",
                "new_tokens": FLAGS.new_tokens, "repeats": FLAGS.repeats, "warmup": 1, "dtype": FLAGS.dtype,
                "threads": FLAGS.threads}
        return run_torch_side("bench_generate_torch.py", spec, python, FLAGS.threads)


def padded_ids(model, texts):
    """Left-padded ids and mask [batch, width] of `texts` under `model`'s tokenizer (what generate_batch feeds)."""
    import numpy as np

    encoded = [model.tokenizer.encode(t, add_special_tokens=True).ids for t in texts]
    width = max(map(len, encoded))
    ids = np.full((len(texts), width), model.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
    return ids, mask


def rates(timing: dict, tokens: int) -> dict:
    return {**timing, "tokens_per_s": tokens / timing["median_seconds"],
            "cpu_tokens_per_s": tokens / timing["median_cpu_seconds"]}


def main(argv):
    if FLAGS.threads > 0:
        restrict_cpu_threads(FLAGS.threads)
    import jax

    from linalign_jax.data import load_texts
    from linalign_jax.generate import HybridPair, generate_batch
    from linalign_jax.generate.hybrid import load_pair_map
    from linalign_jax.generate.token_map import fit_token_map
    from linalign_jax.io_utils import atomic_write_json
    from linalign_jax.models import load_model

    if FLAGS.new_tokens < 1 or FLAGS.repeats < 1 or FLAGS.batch < 1:
        raise LinalignError(f"--batch, --new_tokens and --repeats must be >= 1, got {FLAGS.batch}, "
                            f"{FLAGS.new_tokens}, {FLAGS.repeats}")
    texts = prompts(FLAGS.batch)
    tokens = FLAGS.batch * FLAGS.new_tokens
    model = load_model(FLAGS.model, dtype=FLAGS.dtype)
    loads = {"start": load_average()}

    def native():
        return generate_batch(model, texts, max_new_tokens=FLAGS.new_tokens, eos_ids=(), batch_size=FLAGS.batch)

    ours = native()  # warm-up: compiles every shape
    agreement = None
    result = {"native": rates(timed(native, FLAGS.repeats), tokens)}
    loads["native"] = load_average()
    ids, mask = padded_ids(model, texts)
    result["torch"] = run_torch(hf_directory(FLAGS.model), ids, mask)
    loads["torch"] = load_average()
    if "seconds" in result["torch"]:
        torch_side = result["torch"]
        theirs = torch_side.pop("new_ids")
        result["torch"] = rates({**torch_side, "median_seconds": statistics.median(torch_side["seconds"]),
                                 "median_cpu_seconds": statistics.median(torch_side["cpu_seconds"])}, tokens)
        agreement = sum(a == b for r, t in zip(ours, theirs) for a, b in zip(r.token_ids, t)) / tokens
    if FLAGS.source_model:
        source = load_model(FLAGS.source_model, dtype=FLAGS.dtype)
        if FLAGS.map_dir:
            affine, _ = load_pair_map(FLAGS.map_dir, source, model)
        else:
            affine, _ = fit_token_map(source, model, load_texts("public", limit=FLAGS.map_texts))
        pair = HybridPair(source, model, affine)

        def hybrid():
            return pair.generate_batch(texts, max_new_tokens=FLAGS.new_tokens, eos_ids=(), batch_size=FLAGS.batch)

        rollbacks = sum(r.stats["rollbacks"] for r in hybrid())
        result["hybrid"] = {**rates(timed(hybrid, FLAGS.repeats), tokens), "rollbacks_per_run": rollbacks}
        loads["hybrid"] = load_average()

    report = {"model": FLAGS.model, "source_model": FLAGS.source_model, "batch": FLAGS.batch,
              "new_tokens": FLAGS.new_tokens, "repeats": FLAGS.repeats, "threads": FLAGS.threads, "dtype": FLAGS.dtype,
              "prompts": texts, "sides": result, "load_average": loads,
              "native_tokens_per_s": result["native"]["tokens_per_s"],
              "torch_tokens_per_s": result["torch"].get("tokens_per_s"),
              "hybrid_tokens_per_s": result.get("hybrid", {}).get("tokens_per_s"),
              "native_vs_torch_token_agreement": agreement, "devices": [str(d) for d in jax.devices()], "machine": platform.platform(),
              "targets": {"native_vs_torch": NATIVE_VS_TORCH_TARGET, "hybrid_vs_native": HYBRID_VS_NATIVE_TARGET}}
    for name, (a, b) in {"native_vs_torch": ("native", "torch"), "hybrid_vs_native": ("hybrid", "native")}.items():
        if "tokens_per_s" in result.get(a, {}) and "tokens_per_s" in result.get(b, {}):
            report[name] = result[a]["tokens_per_s"] / result[b]["tokens_per_s"]
            report[name + "_cpu"] = result[a]["cpu_tokens_per_s"] / result[b]["cpu_tokens_per_s"]
    atomic_write_json(FLAGS.json_out, report)
    print(markdown(report))


def markdown(report: dict) -> str:
    sides = report["sides"]
    lines = [f"\n{report['model']}, batch {report['batch']} × {report['new_tokens']} new tokens, greedy, "
             f"{report['threads']} thread(s), {report['dtype']}; load average {report['load_average']}\n",
             "| side | tokens/s (wall) | tokens/s (CPU) |", "|---|---|---|"]
    for name in ("native", "torch", "hybrid"):
        if "tokens_per_s" in sides.get(name, {}):
            lines.append(f"| {name} | {sides[name]['tokens_per_s']:.1f} | {sides[name]['cpu_tokens_per_s']:.1f} |")
    for name, target in report["targets"].items():
        if name in report:
            verdict = "met" if report[name] >= target else "NOT met"
            lines.append(f"| **{name}** | **{report[name]:.2f}×** (target ≥ {target}×: {verdict}) | "
                         f"{report[name + '_cpu']:.2f}× |")
    if report["native_vs_torch_token_agreement"] is not None:
        lines.append(f"\nnative vs torch greedy token agreement: {report['native_vs_torch_token_agreement']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
