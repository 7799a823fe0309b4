"""The README's "HELIX across two machines" steps, run as written on one machine (issue 16): secrets with openssl, the
provider from its flagfile, the client's fit and classify over TLS with hostname verification. Only what would take
minutes or collide is replaced, by flags appended to the README's own commands: a tiny saved head and synthetic
public-set embeddings instead of the models, the test ring, and a free port instead of 50051."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serve.conftest import PRESET, REPO

pytest.importorskip("openfhe")
if not shutil.which("openssl"):
    pytest.skip("the README's secrets step needs the openssl CLI", allow_module_level=True)


def readme_blocks() -> dict[str, str]:
    """The indented command blocks of the README section, by step heading ("1.", "2.", "3.")."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## HELIX across two machines"):text.index("### Threat model")]
    blocks = {}
    for step in re.split(r"^### ", section, flags=re.M)[1:]:
        lines = [line[4:] for line in step.splitlines() if line.startswith("    ")]
        blocks[step.split(" ", 1)[0]] = "\n".join(lines)
    return blocks


def with_flags(block: str, module: str, extra: str) -> str:
    """Append flags to the README command running `module` (after its line continuations)."""
    out, pending = [], False
    for line in block.splitlines():
        pending = pending or f"-m {module}" in line
        if pending and not line.endswith("\\"):
            line, pending = f"{line} {extra}", False
        out.append(line)
    return "\n".join(out)


def test_readme_two_machine_steps_work_on_one_machine(artefacts, tmp_path):
    blocks = readme_blocks()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
    (tmp_path / "configs").symlink_to(REPO / "configs")
    bash = lambda script: subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True,
                                         text=True, timeout=300)
    step = bash(blocks["1."])
    assert step.returncode == 0, step.stderr
    assert (tmp_path / "secrets/provider.crt").exists() and (tmp_path / "secrets/helix_token").exists()

    root = artefacts["root"]
    provider_cmd = with_flags(blocks["2."], "experiments.helix_provider",
                              f"--head={root / 'head'} --model= --task_data= --public_data= "
                              f"--public_features={root / 'public_a.npy'} --public_name=synthetic --port=0 "
                              f"--port_file=port.json --preset={PRESET} --allow_insecure_preset_for_tests")
    provider = subprocess.Popen(["bash", "-euc", f"exec {provider_cmd}"], cwd=tmp_path, env=env,
                                stderr=open(tmp_path / "provider.log", "w"))
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "port.json").exists():
            assert provider.poll() is None and time.monotonic() < deadline, (tmp_path / "provider.log").read_text()
            time.sleep(0.2)
        port = json.loads((tmp_path / "port.json").read_text())["port"]
        np.save(tmp_path / "b.npy", artefacts["Z_B"])
        np.save(tmp_path / "q.npy", artefacts["Z_B"][:6])
        np.save(tmp_path / "y.npy", np.arange(6) % len(artefacts["head"].labels))
        client = blocks["3."].replace(":50051", f":{port}")
        client = with_flags(client, "experiments.helix_client --mode=fit",
                            "--public_features=b.npy --rank=8 --allow_insecure_preset_for_tests")
        client = with_flags(client, "experiments.helix_client --flagfile",
                            "--features=q.npy --labels=y.npy --allow_insecure_preset_for_tests")
        step = bash(client)
        assert step.returncode == 0, step.stderr[-3000:]
    finally:
        provider.terminate()
        provider.wait(timeout=30)
    result = json.loads((tmp_path / "runs/client/predictions.json").read_text())
    assert result["summary"]["queries"] == 6 and (tmp_path / "runs/client/secure_map").is_dir()
    assert "accuracy (encrypted)" in step.stdout and "secure fit: map [48 -> 8]" in step.stdout
