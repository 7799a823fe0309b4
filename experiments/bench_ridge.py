"""Benchmark: ridge map fit, N × d_in → d_out (default 100k × 1024 → 1024), ours vs numpy normal equations.

    python -m experiments.bench_ridge [--n=100000 --d_in=1024 --d_out=1024 --repeats=3 --json_out=bench_ridge.json]

Rows timed in the same process on the same data:
  numpy-f64     reference: centre in float64, W = solve(XᵀX + λI, XᵀY) with numpy (BLAS threads as configured by
                OMP_NUM_THREADS / OPENBLAS_NUM_THREADS)
  ours-f32-xla  streamed statistics, float32 Gram products in XLA (rows sharded over the local "data" mesh; XLA uses
                its own thread pool), float64 host accumulation and eigen-solve
  ours-f64      streamed statistics in host float64 (exact path)
  ours-f32-gcv  ours-f32-xla with λ chosen by GCV over 41 values (one eigendecomposition)
  ours-f32-stats the statistics alone (accumulate_stats, float32): the compute-bound part, 2·N·d_in·(d_in + d_out)
                FLOPs, set against `peak_tflops`, the best plain float32 n × n matmul (--peak_size) measured in the same
                run on the same device: `fraction_of_peak` (target ≥ 70% on CPU).
Each row reports the best wall time over repeats, its process CPU time, the speed-up over numpy-f64, and the
relative Frobenius error of W against numpy-f64 (target ≤ 1e-5). Prints a markdown table last and writes JSON.
"""
from __future__ import annotations

import os
import platform
import time

import numpy as np
from absl import flags

from experiments.bench_common import measured_peak_tflops
from linalign_jax import cli
from linalign_jax.align.ridge import accumulate_stats, iterate_batches, solve_ridge
from linalign_jax.io_utils import atomic_write_json

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 100_000, "rows")
flags.DEFINE_integer("d_in", 1024, "source dim")
flags.DEFINE_integer("d_out", 1024, "target dim")
flags.DEFINE_integer("rows_per_batch", 8192, "rows per streamed batch")
flags.DEFINE_float("fixed_lambda", 1.0, "λ of the fixed-λ rows")
flags.DEFINE_integer("repeats", 3, "timed repeats per row (best is reported)")
flags.DEFINE_integer("peak_size", 0, "n of the float32 n x n matmuls that measure the peak (0 = 2048 on CPU, "
                     "8192 on GPU)")
flags.DEFINE_string("json_out", "bench_ridge.json", "JSON output path")

TARGET_FRACTION_OF_PEAK = 0.7


def make_data(n: int, d_in: int, d_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embedding-like data: correlated features with a common offset, and a noisy linear target."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d_in, d_in), dtype=np.float32) / np.sqrt(d_in)
    x = rng.standard_normal((n, d_in), dtype=np.float32) @ (np.eye(d_in, dtype=np.float32) + 0.5 * mix) + 0.3
    w = rng.standard_normal((d_in, d_out), dtype=np.float32) / np.sqrt(d_in)
    y = x @ w + 0.1 * rng.standard_normal((n, d_out), dtype=np.float32) - 0.2
    return x, y


def numpy_normal_equations(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    W = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
    return W, my - mx @ W


def ours(x, y, lam, precision, batch_size):
    affine, info = solve_ridge(accumulate_stats(iterate_batches(x, y, batch_size), precision=precision), lam)
    return affine.W, affine.b, info


def timed(fn, repeats):
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best[0]:
            best = (wall, cpu, out)
    return best


def main(argv):
    del argv
    import jax

    x, y = make_data(FLAGS.n, FLAGS.d_in, FLAGS.d_out)
    lam = FLAGS.fixed_lambda
    # Compile once outside the timing (the jitted batch function has one shape per batch size).
    ours(x[:2 * FLAGS.rows_per_batch], y[:2 * FLAGS.rows_per_batch], lam, "float32", FLAGS.rows_per_batch)
    ref_wall, ref_cpu, (W_ref, b_ref) = timed(lambda: numpy_normal_equations(x, y, lam), FLAGS.repeats)
    rows = [{"method": "numpy-f64", "wall_s": ref_wall, "cpu_s": ref_cpu, "speedup": 1.0, "rel_err_W": 0.0,
             "rel_err_b": 0.0}]
    for name, precision, lam_arg in (("ours-f32-xla", "float32", lam), ("ours-f64", "float64", lam),
                                     ("ours-f32-gcv", "float32", "auto")):
        wall, cpu, (W, b, info) = timed(lambda: ours(x, y, lam_arg, precision, FLAGS.rows_per_batch), FLAGS.repeats)
        row = {"method": name, "wall_s": wall, "cpu_s": cpu, "speedup": ref_wall / wall, "lambda": info["lambda"]}
        if lam_arg != "auto":
            row["rel_err_W"] = float(np.linalg.norm(W - W_ref) / np.linalg.norm(W_ref))
            row["rel_err_b"] = float(np.linalg.norm(b - b_ref) / np.linalg.norm(b_ref))
        rows.append(row)
    wall, cpu, _ = timed(lambda: accumulate_stats(iterate_batches(x, y, FLAGS.rows_per_batch), precision="float32"),
                         FLAGS.repeats)
    flops = 2.0 * FLAGS.n * FLAGS.d_in * (FLAGS.d_in + FLAGS.d_out)
    peak = measured_peak_tflops("float32", FLAGS.peak_size)
    stats_row = {"method": "ours-f32-stats", "wall_s": wall, "cpu_s": cpu, "speedup": ref_wall / wall,
                 "tflops": flops / wall / 1e12}
    rows.append(stats_row)
    env = {"n": FLAGS.n, "d_in": FLAGS.d_in, "d_out": FLAGS.d_out, "rows_per_batch": FLAGS.rows_per_batch, "lambda": lam,
           "repeats": FLAGS.repeats, "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "jax": jax.__version__, "numpy": np.__version__, "devices": [str(d) for d in jax.devices()],
           "machine": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "load_avg_1m": os.getloadavg()[0]}
    fraction = stats_row["tflops"] / peak
    atomic_write_json(FLAGS.json_out, {"env": env, "rows": rows, "stats_tflops": stats_row["tflops"],
                                       "peak_tflops": peak, "fraction_of_peak": fraction,
                                       "target_fraction_of_peak": TARGET_FRACTION_OF_PEAK})
    print(f"\nridge fit {FLAGS.n} × {FLAGS.d_in} → {FLAGS.d_out}, λ={lam}, best of {FLAGS.repeats}; "
          f"load avg {env['load_avg_1m']:.1f} on {env['cpu_count']} cores; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    print("\n| method | wall s | CPU s | speed-up vs numpy-f64 | rel. err W | rel. err b |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        err = lambda k: (f"{r[k]:.2e}" if k in r else "– (GCV λ={:.3g})".format(r["lambda"]) if "lambda" in r  # noqa: E731
                         else "–")
        print(f"| {r['method']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['speedup']:.2f}× | {err('rel_err_W')} | "
              f"{err('rel_err_b')} |")
    verdict = "met" if fraction >= TARGET_FRACTION_OF_PEAK else "NOT met"
    print(f"\nstatistics {stats_row['tflops']:.3f} TFLOP/s vs float32 matmul peak {peak:.3f} TFLOP/s measured in this "
          f"run: **{fraction:.1%} of peak** (target ≥ {TARGET_FRACTION_OF_PEAK:.0%}: {verdict})")


if __name__ == "__main__":
    cli.run(main)
