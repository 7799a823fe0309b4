"""A bounded run of the provider fuzzer (`make fuzz` runs 10,000): mutated bundles, keys, ciphertexts, headers and
fit streams against a real provider process while an honest session keeps querying."""
import json
import os
import subprocess
import sys

import pytest

from tests.serve.conftest import REPO

pytest.importorskip("openfhe")


def test_fuzzed_provider_survives_and_keeps_serving(tmp_path):
    out = tmp_path / "fuzz.json"
    run = subprocess.run([sys.executable, "-m", "experiments.fuzz_provider", "--iterations=600", "--warmup=200",
                          f"--json_out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"})
    assert out.exists(), run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["iterations"] == 600 and result["crashes"] == 0, result["crash_details"]
    assert result["internal_errors"] == 0, result["internal_tracebacks"]
    assert result["good_session_ok"] and result["good_queries"] > 0, result["good_failures"]
    assert result["rss_growth_mb"] < 100, result  # bounded: allocator arenas, never per-request growth
    assert run.returncode == 0
