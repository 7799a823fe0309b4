"""GPU check: the accelerator numbers the project promises, measured in one run of at most ~8 minutes on one H200.

    python -m experiments.gpu_check                # from the repo root; writes benchmarks/gpu_check_<date>.{json,md}
    python -m experiments.gpu_check --smoke        # small shapes on CPU, a few minutes: checks the code paths

Sections (each under its own time budget and try/except, so one failure still reports the others; --sections runs
a subset, e.g. to redo one that failed):
  extract                      `experiments.bench_extract --random_llama8b` in a subprocess (its own GPU memory):
                               a Llama-3-8B-shaped decoder (32 layers, d=4096, GQA 8, SwiGLU 14336) with random
                               bf16 weights, batch 16 x 512, JAX (the project's model code and jitted pooled
                               forward) vs PyTorch transformers eager; tokens/s and MFU as bench_extract defines them.
                               (--smoke: the tiny Llama test fixture instead, through the same bench_extract path.)
  ridge                        streamed ridge statistics for N = 1M rows of 4096 -> 4096 (`align.ridge`, true
                               float32 Gram products on the GPU, float64 host totals) + the float64 solve; rows/s.
                               Checked against the same fit in float64 with torch on the GPU (error of W). Rows
                               stream from a pool of 4 distinct chunks (generating 32 GB of random rows would
                               dominate the run), so the rows repeat; throughput is unaffected.
  optax                        the optax map (4096 -> 4096, Adam, batch 4096) via `align.distributed`; train
                               samples/s from two runs of 2 and 52 epochs (compile and transfer time cancel),
                               and the 52-epoch run's samples/s including them. (Fixed since the 2026-11-30 run,
                               where the data were jit constants; not measured on a GPU since.)
  prefill                      the fused attention (`DecoderConfig.attention`): the full forward pass of a random
                               Llama-3-8B-shaped decoder, bf16, 16 x 512 right-padded, attention="fused" vs
                               "explicit" (median of 5 after 2 warm-ups): tokens/s, MFU (bench_extract's FLOPs),
                               fused / explicit and fused / PyTorch sdpa (the extract section's torch side); whether
                               cuDNN's fmha kernel is in the compiled program; max |fused - explicit| on real tokens;
                               a 16-step KV-cache decode with the fused config vs the full forward's argmax.
  decode                       batched greedy decoding, batch 64, random Llama-3-8B shape, bf16, 128-token prompts,
                               64 new tokens: JAX (`generate.decoding.CacheRows` + LM head + argmax per step, the
                               loop `generate_batch` runs) vs transformers `generate` (eager, sdpa) in a subprocess
                               on the same ids; generated tokens/s and the ratio.
Needs only jax, flax, optax, numpy, absl, safetensors, tokenizers (+ torch and transformers for the PyTorch rows).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU with JAX in this process

import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from linalign_jax import cli  # noqa: E402
from linalign_jax.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Tiny shapes on whatever device is present: exercises every code path quickly.")
flags.DEFINE_string("out_dir", "benchmarks", "Where gpu_check_<date>[_smoke].{json,md} are written.")
flags.DEFINE_list("sections", ["extract", "prefill", "decode", "ridge", "optax"], "Sections to run, in order.")

SIZES = {
    "full": dict(
        bench_extract=["--random_llama8b", "--random_layers=32", "--batch=16", "--length=512", "--n_batches=5",
                       "--warmup=2"],
        ridge_rows=1 << 20, ridge_chunk=1 << 16, ridge_pool=4, ridge_dim=4096,
        optax_rows=1 << 18, optax_dim=4096, optax_batch=4096, optax_epochs=(2, 52),
        llama_layers=32, prefill_batch=16, prefill_length=512, decode_batch=64, decode_prompt=128, decode_new=64,
        budget_s=dict(extract=100, prefill=60, decode=120, ridge=90, optax=90),
    ),
    "smoke": dict(
        # bench_extract's random model is always 4096 wide (~15 GB of host memory even at one layer), too big for a
        # CPU smoke run: the tiny Llama fixture takes the same JAX-vs-PyTorch path with a loaded checkpoint instead.
        bench_extract=["--model=tests/fixtures/decoders/llama_gqa", "--batch=2", "--length=16", "--n_batches=1",
                       "--warmup=1"],
        ridge_rows=1 << 12, ridge_chunk=1 << 10, ridge_pool=2, ridge_dim=32,
        optax_rows=1 << 11, optax_dim=32, optax_batch=256, optax_epochs=(1, 3),
        llama_layers=2, llama_shrink=True, prefill_batch=2, prefill_length=32, decode_batch=4, decode_prompt=16,
        decode_new=4,
        budget_s=dict(extract=200, prefill=120, decode=200, ridge=60, optax=60),
    ),
}


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_budget(seconds: int):
    """Raise SectionTimeout in the main thread after `seconds` (checked whenever control is back in Python)."""
    def expire(signum, frame):
        raise SectionTimeout(f"section exceeded its {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def log(message: str) -> None:
    logger.info("%s", message)


# ------------------------------------------------------------------------------------------------------ extraction

def extract(size: Dict[str, Any]) -> Dict:
    """bench_extract's random Llama-3-8B mode, as a subprocess so its JAX and torch memory is freed on exit."""
    json_out = Path(FLAGS.out_dir) / ".gpu_check_extract.json"
    command = [sys.executable, "-m", "experiments.bench_extract", "--dtype=bfloat16", "--threads=0",
               f"--json_out={json_out}", *size["bench_extract"]]
    log("running " + " ".join(command))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=size["budget_s"]["extract"] - 10, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_extract exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(json_out.read_text())
    json_out.unlink()
    return result


# ----------------------------------------------------------------------------------------------------------- ridge

def ridge_chunks(size: Dict[str, Any]) -> List[tuple[np.ndarray, np.ndarray]]:
    """A pool of distinct (x, y) chunks made on the device: offset embeddings-like x, noisy linear y."""
    d, rows = size["ridge_dim"], size["ridge_chunk"]
    key = jax.random.PRNGKey(1)
    w_key, key = jax.random.split(key)
    w = jax.random.normal(w_key, (d, d), jnp.float32) / np.sqrt(d)

    @jax.jit
    def make(key):
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (rows, d), jnp.float32) + 0.3
        return x, x @ w + 0.1 * jax.random.normal(ky, (rows, d), jnp.float32)

    return [tuple(np.array(a) for a in make(k)) for k in jax.random.split(key, size["ridge_pool"])]  # writable


def ridge(size: Dict[str, Any]) -> Dict:
    from linalign_jax.align import ridge as ridge_lib

    n_chunks = size["ridge_rows"] // size["ridge_chunk"]
    start = time.perf_counter()
    pool = ridge_chunks(size)
    log(f"ridge: {len(pool)} chunks of {size['ridge_chunk']} x {size['ridge_dim']} made in "
        f"{time.perf_counter() - start:.1f} s")
    stream = lambda: (pool[i % len(pool)] for i in range(n_chunks))  # noqa: E731
    lam = 1.0
    start = time.perf_counter()
    stats = ridge_lib.accumulate_stats(stream(), precision="float32", total=size["ridge_rows"])
    stats_s = time.perf_counter() - start
    start = time.perf_counter()
    affine, _ = ridge_lib.solve_ridge(stats, lam)
    solve_s = time.perf_counter() - start
    row = {"rows": size["ridge_rows"], "dim": size["ridge_dim"], "chunk": size["ridge_chunk"], "lambda": lam,
           "stats_s": stats_s, "solve_s": solve_s, "rows_per_s": size["ridge_rows"] / (stats_s + solve_s)}
    try:
        ref_W, row["torch_f64_s"] = torch_ridge_float64(stream(), lam)
        row["rel_err_W_vs_torch_f64"] = float(
            np.linalg.norm(np.asarray(affine.W, np.float64) - ref_W) / np.linalg.norm(ref_W))
    except ImportError as e:
        row["torch_f64"] = f"skipped: {e}"
    return row


def torch_ridge_float64(chunks, lam: float) -> tuple[np.ndarray, float]:
    """Reference W from float64 sums and a float64 solve, in torch on the GPU when there is one."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    n, sx, sy, xtx, xty = 0, None, None, None, None
    for x, y in chunks:
        xt, yt = (torch.from_numpy(a).to(device).double() for a in (x, y))
        if xtx is None:
            sx, sy = xt.sum(0), yt.sum(0)
            xtx, xty = xt.T @ xt, xt.T @ yt
        else:
            sx += xt.sum(0)
            sy += yt.sum(0)
            xtx += xt.T @ xt
            xty += xt.T @ yt
        n += xt.shape[0]
    mx, my = sx / n, sy / n
    cxx = xtx - n * torch.outer(mx, mx) + lam * torch.eye(xtx.shape[0], dtype=torch.float64, device=device)
    W = torch.linalg.solve(cxx, xty - n * torch.outer(mx, my))
    W = W.cpu().numpy()
    return W, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------- optax

def optax_train(size: Dict[str, Any]) -> Dict:
    from linalign_jax.align.optax_map import OptaxMapConfig
    from linalign_jax.align import distributed as fit

    d, rows = size["optax_dim"], size["optax_rows"]
    key = jax.random.PRNGKey(2)
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (rows, d), jnp.float32)
    y = x @ (jax.random.normal(kw, (d, d), jnp.float32) / np.sqrt(d))
    x, y = np.asarray(x), np.asarray(y)
    timings = {}
    for epochs in size["optax_epochs"]:
        config = OptaxMapConfig(batch_size=size["optax_batch"], max_epochs=epochs, patience=epochs + 1,
                                learning_rate=1e-3)
        start = time.perf_counter()
        _, info = fit.fit_optax_map(x, y, jax.random.PRNGKey(0), config)
        timings[epochs] = (time.perf_counter() - start, info)
    (e1, (t1, _)), (e2, (t2, info)) = sorted(timings.items())
    train_rows = rows - max(1, int(round(rows * info["val_fraction"])))
    steps_per_epoch = train_rows // size["optax_batch"]
    samples = (e2 - e1) * steps_per_epoch * size["optax_batch"]
    row = {"rows": rows, "dim": d, "batch": size["optax_batch"], "epochs": [e1, e2], "seconds": [t1, t2],
           "samples_per_s_incl_compile": e2 * steps_per_epoch * size["optax_batch"] / t2,
           "final_val_loss": info["best_val_loss"], "devices": info["devices"]}
    if t2 > t1:
        row.update(samples_per_s=samples / (t2 - t1), steps_per_s=(e2 - e1) * steps_per_epoch / (t2 - t1))
    else:  # compile-time noise larger than the extra epochs (tiny smoke shapes on a busy CPU)
        row.update(samples_per_s=None, steps_per_s=None, note="compile-time noise exceeded the extra epochs")
    return row


# ------------------------------------------------------------------------------------------ prefill and decoding

def llama_shape(size: Dict[str, Any]) -> dict:
    """Llama-3-8B's LlamaConfig fields with size["llama_layers"] layers (--smoke: a narrow model, same code)."""
    from experiments.bench_common import LLAMA3_8B

    hf = {**LLAMA3_8B, "num_hidden_layers": size["llama_layers"]}
    if size.get("llama_shrink"):
        hf.update(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    return hf


def median_seconds(run, warmup: int = 2, repeats: int = 5) -> float:
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def prefill(size: Dict[str, Any], report: Dict[str, Any]) -> Dict:
    import dataclasses
    import functools

    from experiments.bench_common import llama_decoder_config, random_params
    from experiments.bench_extract import DENSE_BF16_PEAK_TFLOPS, flops_per_batch
    from linalign_jax.models import core, decoder_model

    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    config = llama_decoder_config(llama_shape(size), dtype)
    params = random_params(config)
    B, T = size["prefill_batch"], size["prefill_length"]
    rng = np.random.default_rng(0)
    lengths = rng.integers(T // 2, T + 1, B)
    lengths[0] = T
    ids = jnp.asarray(rng.integers(10, config.vocab_size, (B, T)), jnp.int32)
    mask = jnp.asarray(np.arange(T)[None] < lengths[:, None], jnp.int32)   # right-padded
    fused = decoder_model(dataclasses.replace(config, attention="fused"), params, None, spec="random", fingerprint="r")
    flops = flops_per_batch(fused, B, T)
    row, outputs = {"batch": B, "length": T, "dtype": dtype, "layers": config.num_layers}, {}
    for impl in ("fused", "explicit"):
        cfg = dataclasses.replace(config, attention=impl)
        forward = jax.jit(functools.partial(core.forward, cfg))
        seconds = median_seconds(lambda: forward(params, ids, mask).last_hidden_state)
        row[impl] = {"seconds": seconds, "tokens_per_s": B * T / seconds, "tflops": flops / seconds / 1e12}
        outputs[impl] = np.asarray(forward(params, ids, mask).last_hidden_state, np.float32)
        if impl == "fused":
            row["cudnn_fmha"] = "cudnn" in forward.lower(params, ids, mask).compile().as_text().lower()
    real = np.asarray(mask, bool)
    diff = np.abs(outputs["fused"] - outputs["explicit"])[real]
    row["max_abs_fused_minus_explicit"] = float(diff.max())
    row["relative_fused_minus_explicit"] = float(diff.max() / np.abs(outputs["explicit"][real]).max())
    row["fused_vs_explicit"] = row["explicit"]["seconds"] / row["fused"]["seconds"]
    peak = next((p for name, p in DENSE_BF16_PEAK_TFLOPS.items() if name in jax.devices()[0].device_kind), None)
    row["mfu_fused"] = row["fused"]["tflops"] / peak if peak and dtype == "bfloat16" else None
    torch_side = report["sections"].get("extract", {}).get("sides", {}).get("torch")
    if torch_side and torch_side.get("tokens_per_second"):
        row["fused_vs_torch_sdpa"] = row["fused"]["tokens_per_s"] / torch_side["tokens_per_second"]
    # 16 KV-cache steps with the fused config: each step's argmax equals the full forward pass's.
    steps, prompt = 16, ids[:1, :T // 2]
    cache = fused.init_cache(1, T // 2 + steps)
    out, cache = fused.extend(params, prompt, jnp.ones_like(prompt), cache)
    tokens = [int(jnp.argmax(fused.lm_head(params, out.last_hidden_state[:, -1])[0]))]
    for _ in range(steps - 1):
        step = jnp.asarray([[tokens[-1]]], jnp.int32)
        out, cache = fused.extend(params, step, jnp.ones_like(step), cache)
        tokens.append(int(jnp.argmax(fused.lm_head(params, out.last_hidden_state[:, -1])[0])))
    full_ids = jnp.concatenate([prompt, jnp.asarray([tokens[:-1]], jnp.int32)], axis=1)
    full = fused.forward(params, full_ids, jnp.ones_like(full_ids)).last_hidden_state
    reference = np.asarray(jnp.argmax(fused.lm_head(params, full[0, T // 2 - 1:]), -1)).tolist()
    row["kv_decode_argmax_equal_steps"] = sum(a == b for a, b in zip(tokens, reference))
    row["kv_decode_steps"] = steps
    return row


def decode(size: Dict[str, Any], report: Dict[str, Any]) -> Dict:
    from experiments.bench_common import llama_decoder_config, random_params, torch_interpreter
    from linalign_jax.generate.decoding import CacheRows
    from linalign_jax.models import decoder_model

    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    hf = llama_shape(size)
    config = llama_decoder_config(hf, dtype)
    model = decoder_model(config, random_params(config), None, spec="random-llama3-8b-shape", fingerprint="random")
    B, P, N = size["decode_batch"], size["decode_prompt"], size["decode_new"]
    ids = np.random.default_rng(1).integers(10, config.vocab_size, (B, P)).astype(np.int32)
    head = jax.jit(lambda params, hidden: jnp.argmax(model.lm_head_fn(params, hidden), -1))

    def run():
        rows = CacheRows(model, B, P + N)
        rows.prefill(ids.tolist())
        generated = []
        for step in range(N):
            tokens = np.asarray(head(model.params, rows.hidden))   # to the host every step, as generate_batch does
            generated.append(tokens)
            if step + 1 < N:
                rows.feed(dict(enumerate(tokens.tolist())))
        return np.stack(generated, 1)

    ours = run()  # compiles
    seconds = median_seconds(run, warmup=0, repeats=3)
    row = {"batch": B, "prompt": P, "new_tokens": N, "dtype": dtype, "layers": config.num_layers,
           "jax": {"seconds": seconds, "tokens_per_s": B * N / seconds}}
    del model
    python = torch_interpreter()
    if not python:
        row["torch_error"] = "no interpreter with torch + transformers (this one, or .venv-oracle)"
        return row
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/ids.npy", ids)
        np.save(f"{tmp}/mask.npy", np.ones_like(ids))
        spec = {"model_dir": None, "random_llama": hf, "ids": f"{tmp}/ids.npy", "mask": f"{tmp}/mask.npy",
                "new_tokens": N, "repeats": 2, "warmup": 1, "dtype": dtype, "threads": 0}
        proc = subprocess.run([python, str(REPO / "experiments" / "bench_generate_torch.py"), json.dumps(spec)],
                              capture_output=True, text=True, timeout=size["budget_s"]["decode"], cwd=REPO)
    if proc.returncode != 0:
        row["torch_error"] = proc.stderr[-2000:]
        return row
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    torch_seconds = float(np.median(theirs["seconds"]))
    row["torch"] = {"seconds": torch_seconds, "tokens_per_s": B * N / torch_seconds, "device": theirs["device"],
                    "torch": theirs["torch"], "transformers": theirs["transformers"]}
    row["jax_vs_torch"] = row["jax"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
    row["first_token_agreement"] = float(np.mean(ours[:, 0] == np.asarray(theirs["new_ids"])[:, 0]))
    return row


# ------------------------------------------------------------------------------------------------------- reporting

SECTIONS: Dict[str, Callable[..., Dict]] = {"extract": extract, "prefill": prefill, "decode": decode, "ridge": ridge,
                                            "optax": optax_train}
NEEDS_REPORT = ("prefill", "decode")


def machine() -> Dict[str, Any]:
    info = {"jax": jax.__version__, "python": platform.python_version(), "host": platform.node(),
            "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind}
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=True)
        info["nvidia_smi"] = query.stdout.strip().splitlines()
        info["name"] = info["nvidia_smi"][0].split(",")[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        info["name"] = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
    return info


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def markdown(report: Dict[str, Any]) -> str:
    lines = [f"# GPU check {report['date']} on {report['machine']['name']}" + (" (smoke)" if report["smoke"] else ""),
             "", f"jax {report['machine']['jax']}, python {report['machine']['python']}, "
             f"devices {len(report['machine']['devices'])}, wall {report['wall_s']:.0f} s", "",
             "| section | result | numbers |", "|---|---|---|"]
    for name, result in report["sections"].items():
        if "error" in result:
            last = [line for line in result["error"].splitlines() if line.strip()][-1]
            lines.append(f"| {name} | FAILED | {last[:200]} |")
            continue
        if name == "extract":
            numbers = "; ".join(
                f"{side} {fmt(r['tokens_per_second'])} tokens/s, {fmt(r['tflops'])} TFLOP/s, MFU "
                f"{fmt(r['mfu'] and 100 * r['mfu'])}%" for side, r in result["sides"].items())
            numbers += (f" (batch {result['batch']} x {result['length']}, {result['dtype']}); JAX / PyTorch "
                        f"{fmt(result.get('speedup'))}x")
        elif name == "ridge":
            numbers = (f"{result['rows']:,} x {result['dim']} -> {result['dim']}: stats {fmt(result['stats_s'])} s + "
                       f"solve {fmt(result['solve_s'])} s = {fmt(result['rows_per_s'])} rows/s; rel. err. of W vs "
                       f"torch float64 {fmt(result.get('rel_err_W_vs_torch_f64'))} (torch: "
                       f"{fmt(result.get('torch_f64_s'))} s)")
        elif name == "prefill":
            numbers = (f"fused {fmt(result['fused']['tokens_per_s'])} tokens/s ({fmt(result['fused']['tflops'])} "
                       f"TFLOP/s, MFU {fmt(result['mfu_fused'] and 100 * result['mfu_fused'])}%), explicit "
                       f"{fmt(result['explicit']['tokens_per_s'])}; fused / explicit "
                       f"{fmt(result['fused_vs_explicit'])}x, fused / torch sdpa {fmt(result.get('fused_vs_torch_sdpa'))}x;"
                       f" cudnn_fmha: {str(result['cudnn_fmha']).lower()}; max |fused - explicit| "
                       f"{fmt(result['max_abs_fused_minus_explicit'])} (rel. {fmt(result['relative_fused_minus_explicit'])}"
                       f"); KV decode argmax equal {result['kv_decode_argmax_equal_steps']}/{result['kv_decode_steps']}")
        elif name == "decode":
            numbers = (f"batch {result['batch']} x {result['new_tokens']} new tokens ({result['prompt']}-token prompts, "
                       f"{result['dtype']}): JAX {fmt(result['jax']['tokens_per_s'])} tokens/s, PyTorch "
                       f"{fmt(result.get('torch', {}).get('tokens_per_s'))} tokens/s; JAX / PyTorch "
                       f"{fmt(result.get('jax_vs_torch'))}x")
        else:
            numbers = (f"{fmt(result['samples_per_s'])} samples/s, {fmt(result['steps_per_s'])} steps/s "
                       f"(batch {result['batch']}, {result['dim']} -> {result['dim']}; "
                       f"{fmt(result['samples_per_s_incl_compile'])} samples/s including compile)")
        lines.append(f"| {name} | ok ({result['section_s']:.0f} s) | {numbers} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    size = SIZES["smoke" if FLAGS.smoke else "full"]
    unknown = [s for s in FLAGS.sections if s not in SECTIONS]
    if unknown:
        raise app.UsageError(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    start = time.perf_counter()
    info = machine()
    log(f"machine: {info['name']}, jax {info['jax']}, devices {info['devices']}")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "smoke": FLAGS.smoke, "machine": info, "sizes": size, "sections": {}}
    for name in FLAGS.sections:
        log(f"section {name} (budget {size['budget_s'][name]} s)")
        section_start = time.perf_counter()
        try:
            with time_budget(size["budget_s"][name]):
                result = (SECTIONS[name](size, report) if name in NEEDS_REPORT else SECTIONS[name](size))
        except Exception:  # noqa: BLE001  -- report and go on: one broken section must not hide the others
            result = {"error": traceback.format_exc()}
            log(f"section {name} failed:\n{result['error']}")
        result["section_s"] = time.perf_counter() - section_start
        report["sections"][name] = result
    report["wall_s"] = time.perf_counter() - start
    stem = f"gpu_check_{report['date'][:10]}" + ("_smoke" if FLAGS.smoke else "")
    out_dir = Path(FLAGS.out_dir)
    table = markdown(report)
    atomic_write_json(out_dir / f"{stem}.json", report)
    atomic_write_text(out_dir / f"{stem}.md", table)
    log(f"wrote {out_dir / stem}.json and .md")
    print(table)


if __name__ == "__main__":
    cli.run(main)
