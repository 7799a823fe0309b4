"""Scale-out: runtime/mesh/sharding helpers in-process, then the real thing in subprocesses.

The multi-device runs use tests/distributed_worker.py: once with 4 forced host devices in one process, once as 2
processes x 2 devices on localhost with JAX's distributed runtime (gloo CPU collectives). Both must reproduce what one
process on one device computes here (`run_stages`), to 1e-5 of each quantity's scale. The `experiments.scale_out`
binary runs as a third, 2-process job and must write the map a 1-process fit gives.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from linalign_jax import distributed, feature_shards as extract, features
from linalign_jax.align import distributed as fit
from linalign_jax.align.maps import load_map
from linalign_jax.errors import LinalignError
from linalign_jax.models import load_model
from tests import distributed_worker as worker

WORKER = Path(worker.__file__)
REPO = WORKER.parents[1]
SCALE_OUT_LAMBDA = 0.5
SUBPROCESS_TIMEOUT_S = 300
JAX_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
           "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


# ------------------------------------------------------------------------------------------------------ in-process

@pytest.mark.parametrize("n", [0, 1, 5, 90])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_process_slice_partitions_rows_in_order(n, count):
    slices = [distributed.process_slice(n, p, count) for p in range(count)]
    assert [i for s in slices for i in range(n)[s]] == list(range(n))
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1


def test_process_slice_rejects_bad_process():
    with pytest.raises(LinalignError, match="process 2 of 2"):
        distributed.process_slice(10, 2, 2)


@pytest.fixture
def clean_env(monkeypatch):
    for name in JAX_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_initialize_is_a_noop_in_a_single_process(clean_env):
    assert distributed.initialize() is False
    assert distributed.initialize(mode="off") is False
    assert distributed.initialize("localhost:1234", 1, 0) is False  # a one-process "cluster" needs no runtime
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(coordinator_address="localhost:1234"), {}, r"missing \['num_processes', 'process_id'\]"),
    (dict(), {"JAX_NUM_PROCESSES": "2"}, r"missing \['coordinator_address', 'process_id'\]"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, "0 <= process_id < num_processes"),
    (dict(), {"JAX_PROCESS_ID": "one"}, "JAX_PROCESS_ID='one' is not an integer"),
    (dict(mode="sometimes"), {}, "distributed mode 'sometimes'"),
])
def test_initialize_rejects_incomplete_or_bad_settings(clean_env, kwargs, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(LinalignError, match=message):
        distributed.initialize(**kwargs)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, None),  # an salloc shell, outside srun
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_NTASKS": "16"}, "SLURM"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"}, "TPU pod"),
])
def test_detected_cluster(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert distributed.detected_cluster() == expected


def test_global_mesh_axes_and_bad_model_axis():
    mesh = distributed.global_mesh()
    assert mesh.axis_names == ("data", "model")
    assert mesh.shape["data"] == jax.device_count() and mesh.shape["model"] == 1
    with pytest.raises(LinalignError, match="model_axis_size=3 must be >= 1 and divide the device count"):
        distributed.global_mesh(3 * jax.device_count())


def test_sharding_rules_are_checked_against_the_mesh():
    mesh = distributed.local_mesh()
    params = {"layers": {"q_proj": {"kernel": np.zeros((4, 8), np.float32)}}}
    with pytest.raises(LinalignError, match="names mesh axis 'tensor'"):
        distributed.partition_specs(params, mesh, rules=[("q_proj", P(None, "tensor"))])
    with pytest.raises(LinalignError, match="too many axes"):
        distributed.partition_specs(params, mesh, rules=[("q_proj", P(None, None, "model"))])
    params["layers"]["v_proj"] = {"kernel": np.zeros((3, 4, 8), np.float32)}  # layer-stacked
    specs = distributed.partition_specs(params, mesh)
    assert specs["layers"]["q_proj"]["kernel"] == P(None, "model")
    assert specs["layers"]["v_proj"]["kernel"] == P(None, None, "model")


def test_param_path_joins_dict_and_sequence_keys():
    paths = jax.tree_util.tree_flatten_with_path({"params": {"layers": [np.zeros(1), {"kernel": np.zeros(1)}]}})[0]
    assert [distributed.param_path(p) for p, _ in paths] == ["params/layers/0", "params/layers/1/kernel"]


def test_pad_rows_marks_real_rows():
    padded, weights = distributed.pad_rows(np.ones((5, 2), np.float32), 4)
    assert padded.shape == (8, 2) and padded[5:].sum() == 0
    np.testing.assert_array_equal(weights, [1, 1, 1, 1, 1, 0, 0, 0])


def test_host_gathers_are_identities_in_one_process():
    stats = {"n": 3.0, "xtx": np.eye(2)}
    stacked = distributed.process_stack(stats)
    assert stacked["n"].shape == (1,) and stacked["xtx"].shape == (1, 2, 2)
    rows = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(distributed.process_allgather_rows(rows), rows)


# ------------------------------------------------------------------------------------------------- subprocesses

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Launch:
    """`command` as `num_processes` processes of one localhost job, started at once so launches overlap."""

    def __init__(self, out: Path, command: list[str], devices_per_process: int, num_processes: int):
        env = {k: v for k, v in os.environ.items() if k not in JAX_ENV}
        env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
        if num_processes > 1:
            command = command + [f"--coordinator_address=localhost:{_free_port()}", f"--num_processes={num_processes}"]
        self.logs = [out / f"process{p}.log" for p in range(num_processes)]
        self.log_files = [open(log, "w") for log in self.logs]
        self.procs = [subprocess.Popen(command + ([f"--process_id={p}"] if num_processes > 1 else []), env=env,
                                       cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                      for p, log in enumerate(self.log_files)]

    def wait(self) -> None:
        try:
            codes = [proc.wait(timeout=SUBPROCESS_TIMEOUT_S) for proc in self.procs]
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            for log in self.log_files:
                log.close()
        if any(codes):
            tails = "\n".join(f"--- {log.name} ---\n{log.read_text()[-3000:]}" for log in self.logs)
            pytest.fail(f"exit codes {codes}\n{tails}")


def _worker(out: Path, devices_per_process: int, num_processes: int) -> Launch:
    command = [sys.executable, str(WORKER), f"--out={out}", "--model_axis_size=2"]
    return Launch(out, command, devices_per_process, num_processes)


def _scale_out(out: Path) -> Launch:
    """The binary as a 2-process job: tiny BERT -> itself (the second extraction is a cache hit), ridge λ fixed."""
    data = out / "texts.txt"
    data.write_text("\n".join(worker.TEXTS) + "\n")
    command = [sys.executable, "-m", "experiments.scale_out", f"--source_model={worker.TINY_BERT}",
               f"--target_model={worker.TINY_BERT}", f"--data={data}", f"--out_dir={out / 'run'}",
               "--max_length=32", "--batch_size=4", f"--ridge_lambda={SCALE_OUT_LAMBDA}",
               f"--feature_cache={out / 'cache'}", "--nonormalize"]
    return Launch(out, command, devices_per_process=1, num_processes=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the 4-device, 2-process and binary runs, compute the 1-device reference here meanwhile, then collect."""
    assert jax.process_count() == 1
    outs = {name: tmp_path_factory.mktemp(name) for name in ("four_devices", "two_processes", "scale_out")}
    launched = {"four_devices": _worker(outs["four_devices"], 4, 1),
                "two_processes": _worker(outs["two_processes"], 2, 2),
                "scale_out": _scale_out(outs["scale_out"])}
    out_dir = tmp_path_factory.mktemp("reference")
    try:
        reference = worker.run_stages(out_dir, model_axis_size=1)
        reference["shards_dir"] = out_dir / "shards"
        reference["features"] = features.extract_features(load_model(str(worker.TINY_BERT)), worker.TEXTS,
                                                          pooling="mean", max_length=32).array
    finally:
        for launch in launched.values():
            launch.wait()
    results = {name: dict(np.load(outs[name] / "result.npz")) for name in ("four_devices", "two_processes")}
    return {"reference": reference, "scale_out_dir": outs["scale_out"] / "run", **results}


@pytest.fixture(scope="module")
def single_process_reference(runs):
    return runs["reference"]


def _assert_matches_reference(result: dict, reference: dict) -> None:
    pairs = [(key, key) for key in ("ridge_W", "ridge_b", "optax_W", "optax_b", "optax_val_loss", "gathered_rows")]
    pairs += [("features_gathered", "features"), ("features_sharded", "features")]
    for key, ref_key in pairs:
        scale = max(1.0, float(np.abs(reference[ref_key]).max()))
        np.testing.assert_allclose(result[key], reference[ref_key], rtol=0, atol=1e-5 * scale, err_msg=key)
    assert result["shard_cache_hits"].all(), "the second sharded extraction must come from the per-shard cache"
    assert float(result["ridge_n"]) == worker.N_ROWS
    np.testing.assert_allclose(result["matmul"], result["matmul_expected"], rtol=1e-5, atol=1e-5)


EXPECTED_SPECS = {  # mesh ("data", "model") with model = 2, see distributed_worker.transformer_specs
    "embed/embedding": "(None, 'model')",           # rule wants the 1025-row vocab axis, which does not split
    "lm_head": "(None, 'model')",
    "layers/attn/q_proj/kernel": "(None, None, 'model')",  # rules are right-aligned past the layer axis
    "layers/attn/o_proj/kernel": "(None, 'model', None)",
    "layers/mlp_norm/scale": "()",                   # no rule, small: replicated
    "proj/kernel": "(None, 'model')",                # no rule, large: FSDP over its largest divisible axis
}


def test_four_devices_match_one_device(runs):
    result = runs["four_devices"]
    assert int(result["devices"]) == 4 and int(result["processes"]) == 1
    assert "3 local rows cannot be split over this process's 2 'data' shards" in str(result["uneven_rows_error"])
    np.testing.assert_array_equal(result["kernel_shard_shape"], [worker.DX, 64 // 2])
    assert json.loads(str(result["specs"])) == EXPECTED_SPECS
    _assert_matches_reference(result, runs["reference"])


def test_two_processes_match_one_process(runs):
    result = runs["two_processes"]
    assert int(result["devices"]) == 4 and int(result["processes"]) == 2
    np.testing.assert_array_equal(result["kernel_shard_shape"], [worker.DX, 64 // 2])
    assert json.loads(str(result["specs"])) == EXPECTED_SPECS
    _assert_matches_reference(result, runs["reference"])


@pytest.mark.parametrize("damage, message", [
    ("flip_byte", "sha256 differs from the manifest"),
    ("drop_manifest", "no readable manifest.json"),
    ("drop_shard", "is missing"),
    ("grow_n_rows", "shards cover 9 rows of 10"),
])
def test_load_shards_rejects_damaged_runs(tmp_path, single_process_reference, damage, message):
    shards = tmp_path / "shards"
    shutil.copytree(single_process_reference["shards_dir"], shards)
    np.testing.assert_array_equal(extract.load_shards(shards), single_process_reference["features_sharded"])
    manifest = shards / extract.MANIFEST
    shard = shards / json.loads(manifest.read_text())["shards"][0]["file"]
    if damage == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        manifest.unlink()
    elif damage == "drop_shard":
        shard.unlink()
    else:
        meta = json.loads(manifest.read_text())
        meta["n_rows"] += 1
        manifest.write_text(json.dumps(meta))
    with pytest.raises(LinalignError, match=message):
        extract.load_shards(shards)


def test_scale_out_binary_on_two_processes_matches_one_process(runs):
    """experiments.scale_out as a 2-process job writes shards, manifests and the same map as a 1-process fit."""
    run = runs["scale_out_dir"]
    feats = runs["reference"]["features"]
    for side in ("source", "target"):
        manifest = json.loads((run / "features" / side / extract.MANIFEST).read_text())
        assert manifest["processes"] == 2 and [s["rows"] for s in manifest["shards"]] == [[0, 5], [5, 9]]
        np.testing.assert_allclose(extract.load_shards(run / "features" / side), feats, rtol=0, atol=1e-5)
    assert all(s["cache_hit"] for s in manifest["shards"])  # the target side re-used the source side's extraction
    affine, meta = load_map(run / "map", source=str(worker.TINY_BERT), target=str(worker.TINY_BERT))
    assert meta["processes"] == 2 and meta["n_rows"] == len(worker.TEXTS)
    expected, _ = fit.fit_ridge(feats, feats, SCALE_OUT_LAMBDA)
    np.testing.assert_allclose(affine.W, expected.W, rtol=0, atol=1e-5)
    np.testing.assert_allclose(affine.b, expected.b, rtol=0, atol=1e-5)


def test_shard_params_places_host_weights_once():
    mesh = distributed.local_mesh()
    params = {"layers": {"up_proj": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)}}}
    placed = distributed.shard_params(params, mesh)
    kernel = placed["layers"]["up_proj"]["kernel"]
    assert isinstance(kernel, jax.Array) and kernel.sharding.spec == P(None, "model")
    np.testing.assert_array_equal(np.asarray(kernel), params["layers"]["up_proj"]["kernel"])
    assert distributed.shard_params(placed, mesh)["layers"]["up_proj"]["kernel"] is kernel
