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
                               and the 52-epoch run's samples/s including them.
Needs only jax, flax, optax, numpy, absl, safetensors, tokenizers (+ torch and transformers for the PyTorch rows).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU with JAX in this process

import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
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

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Tiny shapes on whatever device is present: exercises every code path quickly.")
flags.DEFINE_string("out_dir", "benchmarks", "Where gpu_check_<date>[_smoke].{json,md} are written.")
flags.DEFINE_list("sections", ["extract", "ridge", "optax"], "Sections to run, in order.")

SIZES = {
    "full": dict(
        bench_extract=["--random_llama8b", "--random_layers=32", "--batch=16", "--length=512", "--n_batches=5",
                       "--warmup=2"],
        ridge_rows=1 << 20, ridge_chunk=1 << 16, ridge_pool=4, ridge_dim=4096,
        optax_rows=1 << 18, optax_dim=4096, optax_batch=4096, optax_epochs=(2, 52),
        budget_s=dict(extract=220, ridge=160, optax=70),
    ),
    "smoke": dict(
        # bench_extract's random model is always 4096 wide (~15 GB of host memory even at one layer), too big for a
        # CPU smoke run: the tiny Llama fixture takes the same JAX-vs-PyTorch path with a loaded checkpoint instead.
        bench_extract=["--model=tests/fixtures/decoders/llama_gqa", "--batch=2", "--length=16", "--n_batches=1",
                       "--warmup=1"],
        ridge_rows=1 << 12, ridge_chunk=1 << 10, ridge_pool=2, ridge_dim=32,
        optax_rows=1 << 11, optax_dim=32, optax_batch=256, optax_epochs=(1, 3),
        budget_s=dict(extract=200, ridge=60, optax=60),
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
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


# ------------------------------------------------------------------------------------------------------- reporting

SECTIONS: Dict[str, Callable[[Dict[str, Any]], Dict]] = {"extract": extract, "ridge": ridge, "optax": optax_train}


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
                result = SECTIONS[name](size)
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
