"""Mutation fuzzing of a real provider process: no client input may crash, hang or bloat it.

    python -m experiments.fuzz_provider --iterations=10000 --json_out=runs/fuzz/provider.json     # make fuzz

Starts `experiments.helix_provider` (test ring, sandbox on) with a small synthetic head and public set, opens one
honest session that keeps querying from a background thread (every answer is checked against the plaintext head),
and sends `--iterations` mutated requests: key bundles with mutated context / public-key / rotation-key bytes,
mutated bundle headers, query ciphertexts with mutated bytes, mutated message headers (wrong types, huge or non-finite
numbers, deep nesting, unknown kinds), random bytes to every method, and mutated secure-fit streams. Mutations are
the adversarial review's: bit flips (1, 8, 64), truncation, 64-bit length words (0, 2^31, 2^40, 2^64-1), zeroed
regions, random tails, all zeros, duplicated regions.

After every request the provider must still be alive; every reply must be OK or a clear status code (INTERNAL is
counted as a failure of its own). JSON (--json_out): iterations, crashes, internal_errors, good_session_ok,
good_queries, rss_growth_mb (provider RSS at the end minus after warm-up), outcomes, internal_tracebacks, seconds.
"""
from __future__ import annotations

import collections
import json
import os
import random
import secrets
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from absl import flags

from linalign_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("iterations", 1000, "mutated requests to send")
flags.DEFINE_integer("seed", 0, "mutation seed")
flags.DEFINE_string("json_out", "", "write the summary here")
flags.DEFINE_integer("warmup", 200, "iterations before the RSS baseline is taken (allocator arenas settle first)")
flags.DEFINE_float("call_timeout_s", 60.0, "client deadline per mutated request (a hang counts as a failure)")

PRESET, D, K, N_PUBLIC = "insecure_n4096", 64, 6, 512
TARGETS = ("bundle_cc", "bundle_pk", "bundle_rk", "bundle_header", "bundle_frame", "query_ct", "query_frame",
           "message_header", "raw", "fit")
ODD_VALUES = (None, True, False, -1, 0, 2 ** 31, 2 ** 53, 2 ** 64, 1e308, -1e308, "", "x" * 5000, [], {},
              [[[[[[[[1]]]]]]]], list(range(5000)), "base", "query", "fit", "../../etc/passwd", "\udcff")


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One of the review's byte mutations (helix_audit/fuzz_mutate.py)."""
    b = bytearray(data)
    kind = rng.choice(["flip1", "flip8", "flip64", "trunc", "huge", "huge_head", "zero_region", "random_tail",
                       "zeros", "dup_region"])
    if not b:
        return "random", os.urandom(rng.randrange(1, 64))
    if kind.startswith("flip"):
        for _ in range(int(kind[4:])):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "trunc":
        b = b[: rng.randrange(len(b))]
    elif kind in ("huge", "huge_head") and len(b) > 8:
        off = rng.randrange(0, min(len(b) - 8, 1024 if kind == "huge_head" else len(b) - 8))
        b[off:off + 8] = struct.pack("<Q", rng.choice([0xFFFFFFFFFFFFFFFF, 1 << 40, 1 << 34, 1 << 31, 0x7FFFFFFF, 0]))
    elif kind == "zero_region":
        i = rng.randrange(len(b))
        n = rng.randrange(1, 4096)
        b[i:i + n] = bytes(len(b[i:i + n]))
    elif kind == "random_tail":
        p = rng.randrange(0, min(512, len(b)))
        b = b[:p] + bytearray(os.urandom(max(0, len(b) - p)))
    elif kind == "zeros":
        b = bytearray(len(b))
    elif kind == "dup_region":
        i = rng.randrange(len(b))
        b[i:i] = b[i:i + rng.randrange(1, 2048)]
    return kind, bytes(b)


def mutate_fields(fields: dict, rng: random.Random) -> dict:
    """A header with one field replaced, removed or added (values of every JSON type, oversized or nested)."""
    out = dict(fields)
    action = rng.choice(["replace", "replace", "delete", "add"])
    if action == "add" or not out:
        out[rng.choice(["extra", "kind", "blobs", "x" * 300])] = rng.choice(ODD_VALUES)
    elif action == "delete":
        out.pop(rng.choice(sorted(out)))
    else:
        out[rng.choice(sorted(out))] = rng.choice(ODD_VALUES)
    return out


def raw_frame(fields: dict, blobs) -> bytes:
    """A wire frame built by hand, so NaN, surrogates and odd `blobs` values reach the provider unchecked."""
    from linalign_jax.helix import frames

    header = json.dumps(fields, allow_nan=True, ensure_ascii=True).encode()
    return frames._PREFIX.pack(frames.MAGIC, frames.VERSION, len(header)) + header + b"".join(blobs)


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmRSS")).split()[1]) / 1024


class Fuzzer:
    def __init__(self, work: Path):
        from linalign_jax.helix.frames import KIND_BUNDLE, unframe
        from linalign_jax.helix.protocol import QueryClient, ServedHead, SecureFitClient
        from linalign_jax.serve.client import ProviderClient
        from linalign_jax.serve.heads import save_head
        from linalign_jax.serve.launch import launch_provider

        rng = np.random.default_rng(FLAGS.seed)
        self.head = ServedHead(rng.normal(size=(D, K)) / np.sqrt(D), rng.normal(size=K), tuple("abcdef"))
        save_head(work / "head", self.head)
        Z_B = rng.normal(size=(N_PUBLIC, 16)) * 0.2
        np.save(work / "public.npy", Z_B @ rng.normal(size=(16, D)) / 4 + 0.1)
        token = secrets.token_hex(24)
        (work / "token").write_text(token)
        self.log_path = work / "provider.log"
        self.log = open(self.log_path, "w")
        self.proc, target = launch_provider(
            {"head": work / "head", "public_features": work / "public.npy", "public_name": "fuzz",
             "token_file": work / "token", "preset": PRESET, "allow_insecure_preset_for_tests": True,
             "max_sessions": 32, "max_sessions_per_client": 32, "idle_timeout_s": 120, "port": 0},
            work / "port.json", timeout_s=300, stderr=self.log)
        self.client = ProviderClient(target, token=token, allow_insecure_preset_for_tests=True,
                                     timeout_s=FLAGS.call_timeout_s)
        info = self.client.info()
        # the honest corpus: a query bundle, a fit bundle, a query ciphertext of a live session
        self.party = QueryClient(D, K, 4.0, preset=PRESET)
        self.bundle = self.party.bundle()
        self.bundle_header, payload = unframe(self.bundle, KIND_BUNDLE)
        a, b, _ = self.bundle_header["part_sizes"]
        self.parts = {"cc": payload[:a], "pk": payload[a:a + b], "rk": payload[a + b:]}
        self.victim = self.client.open_session(self.party.open_fields(), [self.bundle])
        self.query = self.party.encrypt(np.full(D, 0.1))
        self.fitter = SecureFitClient(Z_B, info["fit"], rank=4)
        self.fit_session = self.client.open_session(self.fitter.open_fields(), [self.fitter.bundle()])
        self.fit_batch = next(self.fitter.batches())
        self.good = {"ok": 0, "failed": []}
        self._stop = threading.Event()
        self._good_thread = threading.Thread(target=self._good_session, daemon=True)
        self._good_thread.start()

    def _good_session(self) -> None:
        """An honest client querying throughout: every answer must arrive and be right."""
        from linalign_jax.helix.protocol import QueryClient

        party = QueryClient(D, K, 4.0, preset=PRESET)
        z = np.linspace(-1, 1, D)
        want = z @ self.head.V + self.head.c
        try:
            with self.client.open_session(party.open_fields(), [party.bundle()]) as session:
                while not self._stop.wait(0.2):
                    try:
                        got = party.decrypt(session.query({}, [party.encrypt(z)], timeout_s=30).blobs[0])
                        if np.abs(got - want).max() > 1e-3:
                            raise AssertionError(f"wrong logits (max error {np.abs(got - want).max():.3g})")
                        self.good["ok"] += 1
                    except Exception as e:
                        self.good["failed"].append(f"{type(e).__name__}: {str(e)[:200]}")
        except Exception as e:
            self.good["failed"].append(f"session: {type(e).__name__}: {str(e)[:200]}")
        finally:
            party.close()

    def request(self, target: str, rng: random.Random) -> tuple[str, str, bytes | list]:
        """(method, description, request bytes or a list of stream messages) for one mutation of `target`."""
        from linalign_jax.helix.frames import KIND_BUNDLE, KIND_QUERY, frame, unframe
        from linalign_jax.serve import wire

        open_fields = self.party.open_fields()
        if target.startswith("bundle_") and target[7:] in self.parts:
            parts = dict(self.parts)
            kind, parts[target[7:]] = mutate(parts[target[7:]], rng)
            header = dict(self.bundle_header, part_sizes=[len(parts[p]) for p in ("cc", "pk", "rk")])
            bundle = frame(KIND_BUNDLE, header, parts["cc"] + parts["pk"] + parts["rk"])
            return "OpenSession", kind, wire.encode("open_session", open_fields, [bundle])
        if target == "bundle_header":
            payload = self.parts["cc"] + self.parts["pk"] + self.parts["rk"]
            fields = {"kind": "session_bundle", **mutate_fields(self.bundle_header, rng), "blobs": [len(payload)]}
            return "OpenSession", "fields", wire.encode("open_session", open_fields, [raw_frame(fields, [payload])])
        if target == "bundle_frame":
            kind, bundle = mutate(self.bundle[:4096], rng)
            return "OpenSession", kind, wire.encode("open_session", open_fields, [bundle + self.bundle[4096:]])
        if target == "query_ct":
            header, payload = unframe(self.query, KIND_QUERY)
            kind, payload = mutate(payload, rng)
            return "Query", kind, wire.encode("query", {"session": self.victim.id}, [frame(KIND_QUERY, header, payload)])
        if target == "query_frame":
            kind, blob = mutate(self.query, rng)
            return "Query", kind, wire.encode("query", {"session": self.victim.id}, [blob])
        if target == "message_header":
            method, fields, blobs = rng.choice([
                ("OpenSession", {"kind": "open_session", **open_fields}, [self.bundle]),
                ("Query", {"kind": "query", "session": self.victim.id}, [self.query]),
                ("CloseSession", {"kind": "close_session", "session": "0" * 32}, []),
                ("Info", {"kind": "info_request"}, [])])
            fields = mutate_fields(fields, rng)
            fields.setdefault("blobs", [len(b) for b in blobs])
            return method, "fields", raw_frame(fields, blobs)
        if target == "raw":
            method = rng.choice(["Info", "OpenSession", "Query", "CloseSession"])
            kind, data = mutate(wire.encode(rng.choice(["info_request", "query", "open_session"]), {}, [b"x" * 64]),
                                rng)
            return method, kind, data
        # fit: a stream whose start or batch message is mutated
        fields, blobs = self.fit_batch
        start = {"session": self.fit_session.id, **self.fitter.start_fields()}
        if rng.random() < 0.5:
            start = mutate_fields(start, rng)
            kind = "start fields"
        else:
            header, payload = unframe(blobs[0], KIND_QUERY)
            kind, payload = mutate(payload, rng)
            blobs = [frame(KIND_QUERY, header, payload), *blobs[1:]]
        return "Fit", kind, [raw_frame({"kind": "fit_start", **start, "blobs": []}, []),
                             wire.encode("fit_batch", fields, blobs), wire.encode("fit_end")]

    def send(self, method: str, request) -> str:
        import grpc

        from linalign_jax.serve import wire

        try:
            if method == "Fit":
                for _ in self.client._streams["Fit"](iter(request), timeout=FLAGS.call_timeout_s,
                                                     metadata=self.client._metadata):
                    pass
                return "OK"
            reply = self.client.call_raw(method, request, FLAGS.call_timeout_s)
        except grpc.RpcError as e:
            return e.code().name
        if method == "OpenSession":  # a mutation the provider accepted (coefficients only): close the session
            session = wire.decode(reply).header.get("session")
            self.client.call_raw("CloseSession", wire.encode("close_session", {"session": session}), 30)
        return "OK"

    def close(self) -> None:
        self._stop.set()
        self._good_thread.join(timeout=60)
        for s in (self.victim, self.fit_session):
            s.close()
        self.party.close()
        self.fitter.close()
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.close()


def run(work: Path) -> dict:
    fuzzer = Fuzzer(work)
    rng = random.Random(FLAGS.seed)
    outcomes, crashes, baseline, start = collections.Counter(), [], None, time.perf_counter()
    done = 0
    try:
        for i in range(FLAGS.iterations):
            target = TARGETS[i % len(TARGETS)]
            method, kind, request = fuzzer.request(target, rng)
            outcome = fuzzer.send(method, request)
            outcomes[f"{target}:{outcome}"] += 1
            done = i + 1
            if fuzzer.proc.poll() is not None:
                crashes.append({"iteration": i, "target": target, "mutation": kind, "status": fuzzer.proc.returncode})
                break  # the provider is dead: the run has failed, say where
            if i + 1 == min(FLAGS.warmup, FLAGS.iterations):
                baseline = rss_mb(fuzzer.proc.pid)
            if (i + 1) % 500 == 0:
                print(f"fuzz: {i + 1} / {FLAGS.iterations} requests, provider RSS {rss_mb(fuzzer.proc.pid):.0f} MB, "
                      f"good queries {fuzzer.good['ok']}", file=sys.stderr, flush=True)
        end_rss = rss_mb(fuzzer.proc.pid) if fuzzer.proc.poll() is None else float("nan")
    finally:
        fuzzer.close()
    internal = sum(n for k, n in outcomes.items() if k.endswith(":INTERNAL"))
    log = fuzzer.log_path.read_text()
    tracebacks = [block.split("\n", 1)[0] + " " + block.strip().splitlines()[-1]
                  for block in log.split("helix provider: internal error ")[1:]][:5]
    return {"command": " ".join(sys.argv), "iterations": done, "crashes": len(crashes), "crash_details": crashes,
            "internal_errors": internal, "internal_tracebacks": tracebacks,
            "good_session_ok": not fuzzer.good["failed"] and fuzzer.good["ok"] > 0,
            "good_queries": fuzzer.good["ok"], "good_failures": fuzzer.good["failed"][:10],
            "rss_baseline_mb": baseline, "rss_end_mb": end_rss,
            "rss_growth_mb": None if baseline is None else end_rss - baseline,
            "outcomes": dict(sorted(outcomes.items())), "seconds": time.perf_counter() - start}


def main(argv):
    del argv
    with tempfile.TemporaryDirectory(prefix="helix-fuzz-") as work:
        result = run(Path(work))
    if FLAGS.json_out:
        from linalign_jax.io_utils import atomic_write_json

        Path(FLAGS.json_out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(FLAGS.json_out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "outcomes"}, indent=1))
    print(json.dumps(result["outcomes"], indent=1))
    if result["crashes"] or result["internal_errors"] or not result["good_session_ok"]:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
