"""Defence in depth for untrusted key material: parse and exercise it in a separate worker process first.

`validate.py` already refuses any key whose structure differs from an honest one, so OpenFHE only ever sees honest
layouts with client-chosen coefficients. Should a parser bug remain reachable anyway, the `Sandbox` makes it cost one
request instead of the provider: a long-lived worker (`python -m linalign_jax.helix.sandbox`) with an address-space
limit (RLIMIT_AS) and a CPU budget per job (RLIMIT_CPU, raised before each job) deserializes the public key, encrypts
with it, deserializes the rotation keys and applies every rotation the layout needs — everything the provider will do
with them. If the worker aborts, segfaults, exceeds its limits or misses the wall-clock deadline, the parent kills it
(by its pid), starts a fresh one for the next job and refuses the bundle with a LinalignError (INVALID_ARGUMENT for
that client); the provider process never runs the bytes that crashed it.

Messages between parent and worker are `frames` frames behind a u64 length, over the worker's stdin/stdout.
"""
from __future__ import annotations

import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
from typing import Sequence

from linalign_jax.errors import LinalignError
from linalign_jax.helix import frames

_LENGTH = struct.Struct("<Q")


class Sandbox:
    """One worker process, restarted after a crash; jobs run one at a time."""

    def __init__(self, memory_mb: int = 4096, cpu_s: float = 60.0, timeout_s: float = 120.0):
        self.memory_mb, self.cpu_s, self.timeout_s = memory_mb, cpu_s, timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.crashes = 0

    def check(self, preset: str, rotations: Sequence[int], key_tag: str, public_key: bytes,
              rotation_keys: bytes) -> None:
        """Raise LinalignError unless the worker parsed and used the key material without failing."""
        request = frames.encode("check", {"preset": preset, "rotations": [int(r) for r in rotations],
                                          "key_tag": key_tag}, [public_key, rotation_keys])
        with self._lock:
            reply = self._run(request)
        if reply.kind == "error":
            raise LinalignError(f"key material: {reply.field('message', str)}")

    def start(self) -> None:
        with self._lock:
            self._worker()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _run(self, request: bytes) -> frames.Frame:
        proc = self._worker()
        try:
            proc.stdin.write(_LENGTH.pack(len(request)) + request)
            proc.stdin.flush()
            raw = self._read(proc, _LENGTH.size)
            reply = frames.decode(self._read(proc, _LENGTH.unpack(raw)[0]), ("ok", "error"))
        except (OSError, EOFError, TimeoutError, LinalignError) as e:
            status = self._stop()
            self.crashes += 1
            how = (f"was killed by signal {-status} ({signal.Signals(-status).name})" if status and status < 0
                   else f"failed ({type(e).__name__}: {e})")
            raise LinalignError(f"key material: parsing it in the validation sandbox {how}; refused") from None
        return reply

    def _read(self, proc: subprocess.Popen, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
            if not ready:
                raise TimeoutError(f"no answer within {self.timeout_s:g} s")
            chunk = os.read(proc.stdout.fileno(), n - len(out))
            if not chunk:
                raise EOFError("the worker exited")
            out += chunk
        return bytes(out)

    def _worker(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "linalign_jax.helix.sandbox", str(self.memory_mb), str(self.cpu_s)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
        return self._proc

    def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return proc.wait()


def _serve(memory_mb: int, cpu_s: float) -> None:
    """The worker loop: one job per frame on stdin, one reply on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    import numpy as np
    import openfhe as fhe

    from linalign_jax.helix.keys import parse_rotation_keys
    from linalign_jax.helix.presets import context_for

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return
        job = frames.decode(stdin.read(_LENGTH.unpack(head)[0]), "check")
        used = resource.getrusage(resource.RUSAGE_SELF)
        budget = int(used.ru_utime + used.ru_stime + cpu_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (budget, resource.RLIM_INFINITY))
        cc = context_for(job.field("preset", str))
        try:
            public_key = fhe.DeserializePublicKeyString(job.blobs[0], fhe.BINARY)
            ct = cc.Encrypt(public_key, cc.MakeCKKSPackedPlaintext(np.zeros(cc.GetRingDimension() // 2)))
            if job.blobs[1]:
                cc.InsertEvalAutomorphismKey(parse_rotation_keys(job.blobs[1]), job.field("key_tag", str))
                for r in job.field("rotations", list):
                    cc.EvalRotate(ct, int(r))
            reply = frames.encode("ok")
        except Exception as e:  # an OpenFHE error that did not crash: the bundle is refused all the same
            reply = frames.encode("error", {"message": f"OpenFHE refused it ({type(e).__name__}: {str(e)[-160:]})"})
        finally:
            cc.ClearEvalAutomorphismKeys()
        stdout.write(_LENGTH.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), float(sys.argv[2]))
