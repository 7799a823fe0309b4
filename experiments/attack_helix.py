"""Red-team harness for HELIX: a semi-honest client (holds its secret key, follows the protocol, decrypts raw) tries
to recover the provider's secrets, and the recovery error is printed next to what the protocol's outputs alone give.

    python -m experiments.attack_helix --attack=head --d=256 --k=6 --queries=3 --json_out=/tmp/attack_head.json
    python -m experiments.attack_helix --attack=fit --n=1500 --d_a=64 --d_b=48 --rank=16 --fits=5
    python -m experiments.attack_helix --attack=c1 --d=256 --k=6

Attacks (`linalign_jax.helix.audit` has the raw decryption and the estimators):
* head: least squares for V over the imaginary parts of every raw-decrypted result slot, given the client's own
  raw-decrypted queries (it knows its noise); baseline: the minimum-norm head from the same queries' logits.
* fit: the same estimator on secure-fit sessions (the client's column ciphertexts are the queries, the provider's
  centred, projected embeddings Z̃_A P_A the head); baseline: minimum-norm from the cross-covariance it is meant to get.
* client_fold: averaging repeated queries of the opt-in client-fold layout (where the engine still offers it).
* c1: the same query ciphertext evaluated twice; identical c1 means the provider added no fresh randomness, i.e. c1 is
  a deterministic function of the query and the weights.
JSON (`--json_out`): one record per attack with attack, queries, relative_error, correlation, baseline_relative_error.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import openfhe as fhe
from absl import app, flags

from linalign_jax import cli
from linalign_jax.helix import ClientSession, LinearPlan, ProviderSession, plan_layout
from linalign_jax.helix.audit import (RawDecryptor, least_squares_head, logits_only_baseline, recovery_error,
                                      serialized_limbs)
from linalign_jax.helix.frames import KIND_RESULT, unframe
from linalign_jax.helix.presets import get_preset
from linalign_jax.io_utils import atomic_write_json

FLAGS = flags.FLAGS
flags.DEFINE_list("attack", ["head"], "Attacks to run: head, fit, client_fold, c1.")
flags.DEFINE_string("preset", None, "CKKS preset (default: the production choice for the shape).")
flags.DEFINE_integer("d", 256, "Head input dimension.")
flags.DEFINE_integer("k", 6, "Head classes.")
flags.DEFINE_integer("queries", 3, "Queries (head) or distinct queries (client_fold).")
flags.DEFINE_integer("repeats", 64, "client_fold: repetitions of each query that the attacker averages.")
flags.DEFINE_integer("n", 1500, "fit: public-set size (one block: n <= the provider's block).")
flags.DEFINE_integer("d_a", 64, "fit: provider embedding dimension.")
flags.DEFINE_integer("d_b", 48, "fit: client embedding dimension.")
flags.DEFINE_integer("rank", 16, "fit: rank (column ciphertexts per fit).")
flags.DEFINE_integer("fits", 5, "fit: number of fit sessions the attacker runs.")
flags.DEFINE_integer("attack_seed", 7, "Seed of the provider's secrets and the client's inputs.")
flags.DEFINE_string("json_out", None, "Write the records as JSON here.")


def _result(blob: bytes) -> fhe.Ciphertext:
    return fhe.DeserializeCiphertextString(unframe(blob, KIND_RESULT)[1], fhe.BINARY)


def _query(client, blob: bytes) -> fhe.Ciphertext:
    """One of the client's own (packed) query frames as an OpenFHE ciphertext."""
    return fhe.DeserializeCiphertextString(client.query_bytes(blob), fhe.BINARY)


def _raw(client) -> RawDecryptor:
    preset = get_preset(client.layout.preset)
    return RawDecryptor(client._cc, client._keys, getattr(preset, "base_scale", None))


def _record(name: str, queries: int, estimate: np.ndarray, truth: np.ndarray, baseline: np.ndarray) -> dict:
    rel, corr = recovery_error(estimate, truth)
    base_rel, base_corr = recovery_error(baseline, truth)
    print(f"{name}: {queries} queries -> relative error {rel:.3g}, correlation {corr:.4f}; logits-only baseline: "
          f"relative error {base_rel:.3g}, correlation {base_corr:.4f}")
    return {"attack": name, "queries": queries, "relative_error": rel, "correlation": corr,
            "baseline_relative_error": base_rel, "baseline_correlation": base_corr}


def attack_head(d: int, k: int, queries: int, preset: str | None, rng: np.random.Generator) -> dict:
    layout = plan_layout(d, k, preset=preset)
    V, c = rng.normal(size=(d, k)) / np.sqrt(d), rng.normal(size=k)  # the provider's secret head
    plan = LinearPlan.build(layout, V, c)
    client = ClientSession.create(layout, input_bound=1.0)
    provider = ProviderSession.load(client.bundle(), allowed_presets=(layout.preset,))
    try:
        raw = _raw(client)
        X, Y, zs, rs, scale = [], [], [], [], None
        for _ in range(queries):
            x = rng.uniform(-1, 1, d)
            blob = client.encrypt(x)
            result = provider.evaluate(plan, blob)
            X.append(x)
            Y.append(client.decrypt(result))
            zs.append(raw.slots(_query(client, blob)))
            rs.append(raw.slots(_result(result)))
            scale = float(unframe(result, KIND_RESULT)[0]["output_scale"])
        window = layout.n_diagonals << layout.fold_steps
        M = least_squares_head([(zs, rs)], layout.period, layout.n_diagonals, window, d, k)
        return _record("head", queries, M * scale, V, logits_only_baseline(np.array(X), np.array(Y)))
    finally:
        provider.close()
        client.close()


def attack_fit(n: int, d_a: int, d_b: int, rank: int, fits: int, rng: np.random.Generator) -> dict:
    from linalign_jax.helix.protocol import ProviderCore, PublicEmbeddings, SecureFitClient, ServedHead

    Z_B = rng.normal(size=(n, d_b)) * 0.2
    Z_A = Z_B @ rng.normal(size=(d_b, d_a)) / np.sqrt(d_b) + 0.05 * rng.normal(size=(n, d_a)) + 0.3
    head = ServedHead(rng.normal(size=(d_a, 6)) / np.sqrt(d_a), rng.normal(size=6), tuple("abcdef"))
    public = PublicEmbeddings.from_array("pub", Z_A)
    core = ProviderCore(head, public=public)
    truth = (Z_A - public.mean) @ public.basis(rank)  # what the provider encodes, [n, rank]
    sessions, inputs, outputs, layout, scale = [], [], [], None, None
    for _ in range(fits):
        fit = SecureFitClient(Z_B + 1e-3 * rng.normal(size=Z_B.shape), core.describe()["fit"], rank=rank)
        state, _ = core.open_session(fit.open_fields(), [fit.bundle()])
        try:
            raw, layout = _raw(fit.crypto), fit.layout
            sent: list[bytes] = []

            def batches():
                for fields, blobs in fit.batches():
                    sent.extend(blobs)
                    yield fields, blobs

            replies = list(core.fit(state, fit.start_fields(), batches(), max_reply_bytes=1 << 30))
            results = [b for _, part in replies for b in part]
            if len(results) != len(sent):
                raise SystemExit(f"fit attack: {len(results)} results for {len(sent)} columns (needs one block)")
            scale = float(unframe(results[0], KIND_RESULT)[0]["output_scale"])
            sessions.append(([raw.slots(_query(fit.crypto, b)) for b in sent],
                             [raw.slots(_result(b)) for b in results]))
            inputs.append(fit.X.T)
            outputs.append(np.stack([fit.crypto.decrypt(b) for b in results]))
        finally:
            core.release(state)
            fit.close()
    window = layout.n_diagonals << layout.fold_steps
    M = least_squares_head(sessions, layout.period, layout.n_diagonals, window, n, rank)
    baseline = np.linalg.lstsq(np.concatenate(inputs), np.concatenate(outputs), rcond=None)[0]
    return _record("fit", fits * rank, M * scale, truth, baseline)


def attack_client_fold(d: int, k: int, queries: int, repeats: int, preset: str | None,
                       rng: np.random.Generator) -> dict | None:
    try:
        layout = plan_layout(d, k, preset=preset, method="hybrid_client_fold")
    except Exception as e:  # the engine no longer offers the option
        print(f"client_fold: not applicable ({e})")
        return None
    V = rng.normal(size=(d, k)) / np.sqrt(d)
    plan = LinearPlan.build(layout, V, None)
    client = ClientSession.create(layout, input_bound=1.0)
    provider = ProviderSession.load(client.bundle(), allowed_presets=(layout.preset,))
    try:
        X, Y, zs, rs = [], [], [], []
        for _ in range(queries):
            x = rng.uniform(-1, 1, d)
            values = np.mean([client._decrypt_result(provider.evaluate(plan, client.encrypt(x)))[1]
                              for _ in range(repeats)], axis=0)
            X.append(x)
            Y.append(layout.unpack_outputs(values, 1)[0] * plan.scale)
            zs.append(layout.pack_queries(x[None]).astype(complex))
            rs.append(values.astype(complex))
        M = least_squares_head([(zs, rs)], layout.period, layout.n_diagonals, layout.n_diagonals, d, k, part="real")
        return _record("client_fold", queries * repeats, M * plan.scale, V,
                       logits_only_baseline(np.array(X), np.array(Y)))
    finally:
        provider.close()
        client.close()


def attack_c1(d: int, k: int, preset: str | None, rng: np.random.Generator) -> dict:
    layout = plan_layout(d, k, preset=preset)
    plan = LinearPlan.build(layout, rng.normal(size=(d, k)) / np.sqrt(d), rng.normal(size=k))
    client = ClientSession.create(layout, input_bound=1.0)
    provider = ProviderSession.load(client.bundle(), allowed_presets=(layout.preset,))
    try:
        blob = client.encrypt(rng.uniform(-1, 1, d))
        c1s = [serialized_limbs(_result(provider.evaluate(plan, blob)))[1][-1][1] for _ in range(2)]
        same = float(np.mean(c1s[0] == c1s[1]))
        print(f"c1: the same query evaluated twice -> {same:.1%} of the result's c1 coefficients identical "
              f"({'deterministic: c1 is a function of the query and the weights' if same > 0.5 else 'fresh'})")
        return {"attack": "c1", "queries": 2, "relative_error": None, "correlation": None,
                "baseline_relative_error": None, "identical_c1_fraction": same}
    finally:
        provider.close()
        client.close()


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.attack_seed)
    print(f"attack_helix: load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    records = []
    for name in FLAGS.attack:
        if name == "head":
            records.append(attack_head(FLAGS.d, FLAGS.k, FLAGS.queries, FLAGS.preset, rng))
        elif name == "fit":
            records.append(attack_fit(FLAGS.n, FLAGS.d_a, FLAGS.d_b, FLAGS.rank, FLAGS.fits, rng))
        elif name == "client_fold":
            record = attack_client_fold(FLAGS.d, FLAGS.k, FLAGS.queries, FLAGS.repeats, FLAGS.preset, rng)
            records += [record] if record else []
        elif name == "c1":
            records.append(attack_c1(FLAGS.d, FLAGS.k, FLAGS.preset, rng))
        else:
            raise app.UsageError(f"unknown attack {name!r}; expected head, fit, client_fold or c1")
    if FLAGS.json_out:
        atomic_write_json(FLAGS.json_out, {"results": records, **(records[0] if len(records) == 1 else {})})


if __name__ == "__main__":
    cli.run(main)
