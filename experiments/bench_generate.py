"""Decode speed of hybrid decoding (source body → map → target head, with re-encoding) vs the native target, in one run.

    python -m experiments.bench_generate --out=runs/bench_generate.json

Every mode generates exactly --new_tokens tokens (EOS ignored) greedily from the same prompts after a warm-up run
that compiles every shape. Reported: decode tokens/s of the loop (prefill excluded) and end to end (prefill + decode),
wall and CPU; median over --repeats. Target: hybrid ≥ 0.5× the native target's decode tokens/s. The markdown table
is printed last; the JSON holds every measurement.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time

import jax
from absl import app, flags

from linalign_jax.errors import LinalignError, exit_on_bad_input

FLAGS = flags.FLAGS
flags.DEFINE_string("source_model", "SmolLM2-135M-Instruct", "body model of the hybrid")
flags.DEFINE_string("target_model", "gemma-3-270m", "head model of the hybrid, and the native baseline")
flags.DEFINE_string("map_dir", "", "a saved source → target map; '' fits one on --fit_texts public texts")
flags.DEFINE_integer("fit_texts", 200, "public texts for the map when --map_dir is empty (speed does not need more)")
flags.DEFINE_multi_string("prompt", ["The capital of France is", "Once upon a time, in a small village by the sea,"],
                          "prompts (repeatable)")
flags.DEFINE_integer("new_tokens", 32, "tokens generated per run")
flags.DEFINE_integer("repeats", 3, "timed runs per prompt and mode")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "model dtype")
flags.DEFINE_string("out", "runs/bench_generate.json", "JSON output path")

TARGET_RATIO = 0.5


def _time(run) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    result = run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    steps = result.stats["steps"]
    return {"steps": steps, "decode_tok_s": steps / result.stats["decode_seconds"],
            "decode_cpu_tok_s": steps / result.stats["decode_cpu_seconds"], "e2e_tok_s": steps / wall,
            "e2e_cpu_tok_s": steps / cpu, "wall_s": wall, "cpu_s": cpu, "rollbacks": result.stats.get("rollbacks", 0)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from linalign_jax.data import load_texts
    from linalign_jax.generate import HybridPair, generate
    from linalign_jax.generate.hybrid import load_pair_map
    from linalign_jax.generate.token_map import fit_token_map
    from linalign_jax.io_utils import atomic_write_json
    from linalign_jax.models import load_model

    with exit_on_bad_input():
        if FLAGS.new_tokens < 1 or FLAGS.repeats < 1:
            raise LinalignError(f"--new_tokens and --repeats must be >= 1, got {FLAGS.new_tokens}, {FLAGS.repeats}")
        source = load_model(FLAGS.source_model, dtype=FLAGS.dtype)
        target = load_model(FLAGS.target_model, dtype=FLAGS.dtype)
        if FLAGS.map_dir:
            affine, _ = load_pair_map(FLAGS.map_dir, source, target)
        else:
            affine, _ = fit_token_map(source, target, load_texts("public", limit=FLAGS.fit_texts))
        pair = HybridPair(source, target, affine)

    modes = {
        "native target": lambda p: generate(target, p, max_new_tokens=FLAGS.new_tokens, eos_ids=()),
        "hybrid": lambda p: pair.generate(p, max_new_tokens=FLAGS.new_tokens, eos_ids=()),
        "native source": lambda p: generate(source, p, max_new_tokens=FLAGS.new_tokens, eos_ids=()),
    }
    runs = {mode: [] for mode in modes}
    for prompt in FLAGS.prompt:
        for mode, run in modes.items():
            run(prompt)  # warm-up: compiles this prompt's shapes
            for _ in range(FLAGS.repeats):
                runs[mode].append(_time(lambda: run(prompt)))
            print(f"{mode} {prompt[:30]!r}: {runs[mode][-1]['decode_tok_s']:.2f} tok/s", file=sys.stderr, flush=True)

    summary = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    ratio = summary["hybrid"]["decode_tok_s"] / summary["native target"]["decode_tok_s"]
    cpu_ratio = summary["hybrid"]["decode_cpu_tok_s"] / summary["native target"]["decode_cpu_tok_s"]
    report = {
        "source": source.spec, "target": target.spec, "dtype": FLAGS.dtype, "new_tokens": FLAGS.new_tokens,
        "repeats": FLAGS.repeats, "prompts": FLAGS.prompt, "runs": runs, "median": summary,
        "hybrid_vs_native_decode": ratio, "hybrid_vs_native_decode_cpu": cpu_ratio, "target_ratio": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO, "devices": [str(d) for d in jax.devices()], "machine": platform.platform(),
    }
    atomic_write_json(FLAGS.out, report)
    print(f"\n{source.spec} body → {target.spec} head; {FLAGS.new_tokens} new tokens, median of "
          f"{FLAGS.repeats} × {len(FLAGS.prompt)} prompts, {jax.devices()[0].platform}, {FLAGS.dtype}\n")
    print("| mode | decode tok/s (wall) | decode tok/s (CPU) | end-to-end tok/s (wall) | rollbacks / run |")
    print("|---|---|---|---|---|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['decode_tok_s']:.2f} | {s['decode_cpu_tok_s']:.2f} | {s['e2e_tok_s']:.2f} | "
              f"{s['rollbacks']:.0f} |")
    print(f"| **hybrid / native target** | **{ratio:.2f}×** (target ≥ {TARGET_RATIO}×: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}) | {cpu_ratio:.2f}× | | |")


if __name__ == "__main__":
    app.run(main)
