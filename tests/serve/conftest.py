"""A real provider process on localhost for the transport tests, with small synthetic artefacts.

The provider runs `python -m experiments.helix_provider` exactly as a user would, on the test-only small ring
(`--preset=insecure_n4096 --allow_insecure_preset_for_tests`, 2048 slots) so that a test takes seconds, not minutes.
Every test module here skips cleanly where OpenFHE is missing (the GPU image has none).
"""
from __future__ import annotations

import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PRESET = "insecure_n4096"
D_A, K, D_B, N_PUBLIC = 64, 6, 48, 512


class ProviderProcess:
    """`experiments.helix_provider` in a subprocess; its stderr goes to a log file the tests read."""

    def __init__(self, workdir: Path, **flags):
        from linalign_jax.serve.launch import launch_provider

        name = secrets.token_hex(4)
        self.log = workdir / f"provider-{name}.log"
        self._log_file = open(self.log, "w")
        try:
            self.proc, self.target = launch_provider({"port": 0, "preset": PRESET,
                                                      "allow_insecure_preset_for_tests": True, **flags},
                                                     workdir / f"port-{name}.json", timeout_s=120,
                                                     stderr=self._log_file)
        except Exception as e:
            raise RuntimeError(f"{e}\n{self.log.read_text()[-3000:]}") from None

    @property
    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def wait_for_line(self, pattern: str, timeout: float = 60.0, start: int = 0) -> str:
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"provider never logged /{pattern}/; last lines:\n" + "\n".join(self.lines[-10:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory):
    """Head, public-set embeddings of both parties (related by a linear map plus noise), token, TLS certificate."""
    from linalign_jax.helix.protocol import ServedHead
    from linalign_jax.serve.heads import save_head

    root = tmp_path_factory.mktemp("helix")
    rng = np.random.default_rng(0)
    head = ServedHead(rng.normal(size=(D_A, K)) / np.sqrt(D_A), rng.normal(size=K),
                      tuple(f"class{i}" for i in range(K)))
    save_head(root / "head", head)
    Z_B = rng.normal(size=(N_PUBLIC, D_B)) * 0.2
    T = rng.normal(size=(D_B, D_A)) / np.sqrt(D_B)
    Z_A = Z_B @ T + 0.05 * rng.normal(size=(N_PUBLIC, D_A)) + 0.3
    np.save(root / "public_a.npy", Z_A)
    np.save(root / "public_b.npy", Z_B)
    (root / "token").write_text(secrets.token_hex(24))
    tls = None
    if shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(root / "tls.key"), "-out", str(root / "tls.crt"), "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
        tls = (root / "tls.crt", root / "tls.key")
    return {"root": root, "head": head, "Z_A": Z_A, "Z_B": Z_B, "token": (root / "token").read_text(), "tls": tls}


@pytest.fixture(scope="module")
def provider(artefacts):
    """The shared provider: short idle timeout (expiry tests), small message cap (oversize tests)."""
    root = artefacts["root"]
    proc = ProviderProcess(root, head=root / "head", public_features=root / "public_a.npy", public_name="synthetic",
                           token_file=root / "token", idle_timeout_s=4, max_message_mb=16, max_sessions=40,
                           state_dir=root / "state")
    yield proc
    proc.stop()


@pytest.fixture
def client_for(artefacts):
    """client_for(provider, **options) -> ProviderClient, closed after the test."""
    from linalign_jax.serve.client import ProviderClient

    made = []

    def make(proc, **options):
        options.setdefault("token", artefacts["token"])
        options.setdefault("allow_insecure_preset_for_tests", True)
        made.append(ProviderClient(proc.target, **options))
        return made[-1]

    yield make
    for c in made:
        c.close()
