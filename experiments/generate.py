"""Cross-model generation (paper §3.2): fit token-level maps, measure tokenizer compatibility and next-token quality
of hybrid decoding, and write sample outputs.

    python -m experiments.generate --flagfile=configs/generate_smollm2_gemma3.flags

For each direction (source body → target head; both with --both_directions): the ridge map is fitted on token pairs
of --fit_texts texts (or read from --map_dir), saved under maps/, scored teacher-forced on the next --heldout_texts
texts, and used to continue every --prompt next to both models' own continuations.

Outputs in --out_dir:
    results.md     tokenizer-compatibility, next-token and sample tables
    results.json   written last (the whole folder is staged and swapped in at the end: a failed or interrupted run
                   leaves the previous folder untouched; --map_dir must lie outside --out_dir):
        command, config          the command line and every flag value that matters
        models                   {"source"|"target": {"spec", "fingerprint", "family", "dim", "vocab"}}
        data                     {"fit"|"heldout": {"spec", "n", "fingerprint"}}
        tokenizers               vocab_jaccard, exact_token_match, boundary_match, vocab_sizes, num_tokens, num_texts
                                 (definitions: linalign_jax.tokenizer_compat)
        directions               [{"source", "target", "map": {map metadata, "path"}, "next_token": {positions,
                                 top1_agreement, native_top1_accuracy, hybrid_top1_accuracy, native_perplexity,
                                 hybrid_perplexity, perplexity_degradation_pct, contexts_reused_from_whole_text},
                                 "samples": [{"prompt", "hybrid", "native_target", "native_source",
                                 "finish_reasons", "hybrid_stats"}]}]
        timing                   {"load_s", "total_s", "cpu_s"}
        complete                 true
"""
from __future__ import annotations

import math
import logging
import time
from pathlib import Path

import jax
from absl import flags

from linalign_jax import cli
from linalign_jax.align.ridge import parse_lambda
from linalign_jax.errors import LinalignError

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS
cli.define_model_flags("source_model", "target_model")
cli.define_data_flags(omit=("label_column",))  # --data_seed shuffles `public`, --text_column reads tables
cli.define_extraction_flags(pooled=False)
cli.define_generation_flags()
cli.define_ridge_flag("1e-4")  # the paper's λ for token maps
flags.DEFINE_bool("both_directions", False, "also run target body → source head (models load once)")
flags.DEFINE_string("map_dir", "", "use this saved map (one direction) instead of fitting one")
flags.DEFINE_string("heldout_data", "", "text spec for held-out scoring ('' = the --fit_data texts after the fit ones)")
flags.DEFINE_multi_string("prompt", ["The capital of France is"], "prompt for sample outputs (repeatable)")
flags.DEFINE_float("temperature", 0.0, "0 = greedy (the paper)")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("seed", 0, "PRNG seed of sampling")
flags.DEFINE_multi_string("stop", [], "stop string (repeatable)")
flags.DEFINE_string("out_dir", None, "output directory")
flags.mark_flags_as_required(["source_model", "target_model", "out_dir"])


def _texts(config):
    from linalign_jax.data import fingerprint
    from linalign_jax.generate.protocol import fitting_texts

    for name in ("fit_texts", "heldout_texts"):
        if config[name] < 1:
            raise LinalignError(f"--{name} must be >= 1, got {config[name]}")
    fit_pool = fitting_texts(config["fit_data"], config["data_seed"], config["text_column"])
    fit = fit_pool[:config["fit_texts"]]
    if config["heldout_data"]:
        heldout = fitting_texts(config["heldout_data"], config["data_seed"] + 1,
                                config["text_column"])[:config["heldout_texts"]]
    else:
        heldout = fit_pool[config["fit_texts"]:config["fit_texts"] + config["heldout_texts"]]
    if not heldout:
        raise LinalignError(f"{config['fit_data']!r} has {len(fit_pool)} texts: none left for held-out scoring after "
                            f"--fit_texts={config['fit_texts']}; lower it or pass --heldout_data")
    data = {"fit": {"spec": config["fit_data"], "n": len(fit), "fingerprint": fingerprint(fit)},
            "heldout": {"spec": config["heldout_data"] or config["fit_data"], "n": len(heldout),
                        "fingerprint": fingerprint(heldout)}}
    return fit, heldout, data


def _maps(source, target, fit, data, config, out_dir: Path) -> list:
    """[(source, target, map, metadata, path)] per direction: read from --map_dir, or fitted (one extraction pass)."""
    from linalign_jax.align.maps import save_map
    from linalign_jax.generate.hybrid import load_pair_map
    from linalign_jax.generate.token_map import fit_token_maps

    if config["map_dir"]:
        affine, meta = load_pair_map(config["map_dir"], source, target)
        return [(source, target, affine, meta, Path(config["map_dir"]))]
    log.info(f"fitting token-level maps on {len(fit)} texts")
    fitted = fit_token_maps(source, target, fit, both_directions=config["both_directions"],
                            lam=config["ridge_lambda"], max_length=config["max_length"],
                            batch_size=config["batch_size"])
    out = []
    for (s, t), (affine, meta) in zip([(source, target), (target, source)], fitted):
        meta = {**meta, "fit_data": data["fit"]}
        name = f"{_slug(s.spec)}__to__{_slug(t.spec)}"
        save_map(out_dir / "maps" / name, affine, meta)  # out_dir is the staging copy of --out_dir
        out.append((s, t, affine, meta, Path(config["out_dir"]) / "maps" / name))
    return out


def _direction(source, target, affine, meta, path: Path, heldout, config) -> dict:
    from linalign_jax.generate import HybridPair, SamplingConfig, generate_batch
    from linalign_jax.generate.evaluation import next_token_scores, summarize

    label = f"{source.spec} → {target.spec}"
    pair = HybridPair(source, target, affine)
    log.info(f"[{label}] scoring {len(heldout)} held-out texts")
    metrics = summarize(next_token_scores(pair, heldout, max_tokens=config["heldout_tokens"],
                                          batch_size=config["batch_size"]))
    sampling = SamplingConfig(config["temperature"], config["top_p"])
    kwargs = dict(max_new_tokens=config["max_new_tokens"], sampling=sampling, key=jax.random.key(config["seed"]),
                  stop_strings=config["stop"], batch_size=config["batch_size"])
    log.info(f"[{label}] {len(config['prompt'])} samples (hybrid, native target, native source)")
    hybrid = pair.generate_batch(config["prompt"], **kwargs)
    native_target = generate_batch(target, config["prompt"], **kwargs)
    native_source = generate_batch(source, config["prompt"], **kwargs)
    samples = [{"prompt": h.prompt, "hybrid": h.text, "native_target": t.text, "native_source": s.text,
                "finish_reasons": [h.finish_reason, t.finish_reason, s.finish_reason], "hybrid_stats": h.stats}
               for h, t, s in zip(hybrid, native_target, native_source)]
    return {"source": source.spec, "target": target.spec, "map": {**meta, "path": str(path)}, "next_token": metrics,
            "samples": samples}


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in Path(spec).name or spec)


def run(config: dict, command: str) -> dict:
    from linalign_jax.io_utils import check_outside, staged_dir

    if config["map_dir"] and config["both_directions"]:
        raise LinalignError("--map_dir holds one direction's map; drop --both_directions")
    check_outside(config["out_dir"], map_dir=config["map_dir"])
    start, cpu_start = time.perf_counter(), time.process_time()
    fit, heldout, data = _texts(config)  # checked before any model loads
    with staged_dir(config["out_dir"]) as out_dir:  # a failed run leaves the old folder untouched
        return _run_into(out_dir, config, command, fit, heldout, data, start, cpu_start)


def _run_into(out_dir: Path, config: dict, command: str, fit, heldout, data, start: float, cpu_start: float) -> dict:
    from linalign_jax.io_utils import atomic_write_json, atomic_write_text
    from linalign_jax.models import load_model
    from linalign_jax.tokenizer_compat import tokenizer_compatibility

    source = load_model(config["source_model"], dtype=config["dtype"])
    target = load_model(config["target_model"], dtype=config["dtype"])
    load_s = time.perf_counter() - start
    compat = tokenizer_compatibility(source.tokenizer, target.tokenizer, heldout).as_dict()
    directions = [_direction(*fitted, heldout, config) for fitted in _maps(source, target, fit, data, config, out_dir)]
    results = {
        "command": command, "config": config, "data": data, "tokenizers": compat, "directions": directions,
        "models": {role: {"spec": m.spec, "fingerprint": m.fingerprint, "family": m.family, "dim": m.hidden_size,
                          "vocab": m.config.vocab_size} for role, m in (("source", source), ("target", target))},
        "timing": {"load_s": load_s, "total_s": time.perf_counter() - start,
                   "cpu_s": time.process_time() - cpu_start},
        "complete": True,
    }
    atomic_write_text(out_dir / "results.md", results_markdown(results))
    atomic_write_json(out_dir / "results.json", results)  # last: its presence means the run finished
    return results


def results_markdown(results: dict) -> str:
    t = results["tokenizers"]
    lines = [f"# Cross-model generation: {results['models']['source']['spec']} ↔ {results['models']['target']['spec']}",
             "", f"`{results['command']}`", "",
             "| vocab Jaccard | exact token match | boundary match | held-out texts | tokens (A, B) |",
             "|---|---|---|---|---|",
             f"| {t['vocab_jaccard']:.3f} | {t['exact_token_match']:.3f} | {t['boundary_match']:.3f} | "
             f"{t['num_texts']} | {t['num_tokens'][0]}, {t['num_tokens'][1]} |", "",
             "| source → target | token pairs | λ | top-1 agreement | native top-1 acc | hybrid top-1 acc | "
             "native ppl | hybrid ppl | ppl degradation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in results["directions"]:
        m, n = d["map"], d["next_token"]
        lines.append(f"| {d['source']} → {d['target']} | {m.get('n_pairs', '-')} | {m.get('lambda', math.nan):.3g} | "
                     f"{n['top1_agreement']:.3f} | {n['native_top1_accuracy']:.3f} | {n['hybrid_top1_accuracy']:.3f} | "
                     f"{n['native_perplexity']:.2f} | {n['hybrid_perplexity']:.2f} | "
                     f"{n['perplexity_degradation_pct']:+.1f}% |")
    for d in results["directions"]:
        lines += ["", f"## Samples: {d['source']} body → {d['target']} head", "",
                  "| prompt | hybrid | native target | native source |", "|---|---|---|---|"]
        for s in d["samples"]:
            cells = [s["prompt"], s["hybrid"], s["native_target"], s["native_source"]]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎")


def config_from_flags() -> dict:
    keys = ("source_model", "target_model", "both_directions", "map_dir", "fit_data", "fit_texts", "heldout_data",
            "heldout_texts", "heldout_tokens", "max_length", "batch_size", "prompt", "max_new_tokens", "temperature",
            "top_p", "seed", "data_seed", "text_column", "stop", "dtype", "out_dir")
    return {**{k: FLAGS[k].value for k in keys}, "ridge_lambda": parse_lambda(FLAGS.ridge_lambda)}


def main(argv):
    results = run(config_from_flags(), cli.command_line())
    log.info(f"wrote {FLAGS.out_dir}/results.json in {results['timing']['total_s']:.0f}s "
             f"(CPU {results['timing']['cpu_s']:.0f}s)")
    print(results_markdown(results))


if __name__ == "__main__":
    cli.run(main)
