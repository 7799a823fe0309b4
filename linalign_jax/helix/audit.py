"""What a semi-honest client sees: raw CKKS decryption with its own secret key, before any decoding.

A client holding s can compute c0 + c1·s mod Q for every ciphertext it receives — the encoded message *plus the exact
noise polynomial*, every complex slot with its imaginary part — instead of calling OpenFHE's `Decrypt` (which adds
decoding noise and drops imaginary parts). This module does that from OpenFHE's JSON serialization (RNS limbs in
evaluation form): inverse NTT per limb, CRT, canonical embedding. It exists for the red-team harness
(`experiments/attack_helix.py`) and the tests that measure flood widths; the protocol never uses it.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import openfhe as fhe

from linalign_jax.helix.smoothing import odd_powers


def serialized_limbs(obj: Any) -> tuple[dict, list[tuple[int, np.ndarray]]]:
    """(JSON tree, [(modulus, evaluation-form limb as object ints)]) of a serialized OpenFHE object."""
    text = fhe.Serialize(obj, fhe.JSON)
    tree = json.loads(text if isinstance(text, str) else text.decode())
    limbs: list[tuple[int, np.ndarray]] = []

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            v, m = o.get("v"), o.get("m")
            if isinstance(v, list) and isinstance(m, dict) and "v" in m and v and not isinstance(v[0], (dict, list)):
                limbs.append((int(m["v"]), np.array([int(x) for x in v], dtype=object)))
                return
            for w in o.values():
                walk(w)
        elif isinstance(o, list):
            for w in o:
                walk(w)

    walk(tree)
    return tree, limbs


@functools.lru_cache(maxsize=None)
def _minimal_root(q: int, n: int) -> int:
    """OpenFHE's 2n-th root of unity mod q: the smallest primitive one (NbTheory RootOfUnity)."""
    g = 2
    while True:
        psi = pow(g, (q - 1) // (2 * n), q)
        if pow(psi, n, q) == q - 1:
            break
        g += 1
    best, x, sq = psi, psi, psi * psi % q
    for _ in range(n - 1):  # odd powers psi^(2i+1) are all the primitive roots
        x = x * sq % q
        best = min(best, x)
    return best


@functools.lru_cache(maxsize=None)
def _twiddles(q: int, n: int) -> tuple[list[np.ndarray], np.ndarray, int]:
    psi = _minimal_root(q, n)
    winv = pow(psi * psi % q, q - 2, q)
    stages, m = [], 2
    while m <= n:
        wm = pow(winv, n // m, q)
        stages.append(np.array([pow(wm, k, q) for k in range(m // 2)], dtype=object))
        m *= 2
    psiinv = pow(psi, q - 2, q)
    post = np.array([pow(psiinv, k, q) for k in range(n)], dtype=object) * pow(n, q - 2, q) % q
    return stages, post, psi


def _intt(values: np.ndarray, q: int) -> np.ndarray:
    """Coefficients (object ints in [0, q)) of an OpenFHE evaluation-form limb (bit-reversed order)."""
    n = len(values)
    stages, post, _ = _twiddles(q, n)
    a = values.copy()
    m = 2
    for ws in stages:
        a = a.reshape(-1, m)
        u, t = a[:, : m // 2].copy(), (a[:, m // 2:] * ws) % q
        a[:, : m // 2], a[:, m // 2:] = (u + t) % q, (u - t) % q
        a = a.reshape(-1)
        m *= 2
    return (a * post) % q


def _crt_centered(residues: list[np.ndarray], moduli: list[int]) -> np.ndarray:
    Q = 1
    for q in moduli:
        Q *= q
    total = np.zeros(len(residues[0]), dtype=object)
    for r, q in zip(residues, moduli):
        Qi = Q // q
        total = (total + r * (Qi * pow(Qi % q, q - 2, q))) % Q
    return np.where(total > Q // 2, total - Q, total)


class RawDecryptor:
    """The client's raw view of its ciphertexts: exact coefficients of c0 + c1·s and all complex slots."""

    def __init__(self, cc: fhe.CryptoContext, keys: fhe.KeyPair, base_scale: float | None):
        """`base_scale`: the preset's scaling factor 2^S (FIXEDMANUAL: a ciphertext of degree d has scale 2^(S·d);
        OpenFHE's own scale field is not maintained under FIXEDMANUAL). None: read the scale OpenFHE serializes
        (right for FLEXIBLEAUTO contexts, e.g. the engine before sanitization)."""
        self.cc, self.n, self.base_scale = cc, cc.GetRingDimension(), base_scale
        self._sk = dict(serialized_limbs(keys.secretKey)[1])
        self._slot_map = self._calibrate(keys.publicKey)

    def coefficients(self, ct: fhe.Ciphertext) -> tuple[np.ndarray, float]:
        """(centred integer coefficients of c0 + c1·s mod Q as object ints, its scale (scaling factor to the power of its degree))."""
        tree, limbs = serialized_limbs(ct)
        if self.base_scale is None:
            data = tree["value0"]["ptr_wrapper"]["data"]
            scale = float(data["s"]) ** int(data["d"])
        else:
            scale = self.base_scale ** ct.GetNoiseScaleDeg()
        towers = len(limbs) // 2
        moduli, residues = [], []
        for (q, c0), (_, c1) in zip(limbs[:towers], limbs[towers:]):
            moduli.append(q)
            residues.append(_intt((c0 + c1 * self._sk[q]) % q, q))
        return _crt_centered(residues, moduli), scale

    def slots(self, ct: fhe.Ciphertext) -> np.ndarray:
        """Every complex slot of the raw decryption (imaginary parts kept), in the encoder's slot order."""
        coef, scale = self.coefficients(ct)
        return self._odd_powers(coef, scale)[self._slot_map]

    @staticmethod
    def _odd_powers(coef: np.ndarray, scale: float) -> np.ndarray:
        """p(ζ^(2j+1)) / scale for j < n (object-int coefficients)."""
        return odd_powers(np.array([float(c) for c in coef]) / scale)

    def _calibrate(self, public_key: fhe.PublicKey) -> np.ndarray:
        """OpenFHE's slot t is p(ζ^(e·5^t)) for one odd e fixed by its NTT convention: find e with a known encryption."""
        n = self.n
        x = np.random.default_rng(0).uniform(-1, 1, n // 2)
        ct = self.cc.Encrypt(public_key, self.cc.MakeCKKSPackedPlaintext(x))
        values = self._odd_powers(*self.coefficients(ct))
        powers = np.array([pow(5, t, 2 * n) for t in range(n // 2)])
        for e in range(1, 2 * n, 2):
            index = ((e * powers) % (2 * n) - 1) // 2
            if np.abs(values[index].real - x).max() < 1e-3:
                return index
        raise RuntimeError("raw decryption: no slot convention matches a known encryption")


# ------------------------------------------------------------------------------------------- recovery estimators


def window_design(z: np.ndarray, n: int, window: int, rows: np.ndarray) -> np.ndarray:
    """Design matrix of a hybrid-layout result: slot t holds Σ_{j<window} M[t mod k, (t+j) mod n] · z[(t+j) mod S].

    Row r (slot rows[r]) gives the coefficients of M[class, 0..n-1] in terms of the query's complex slots z. `window`
    is k·2^fold_steps: the period n when the fold stays inside one period, the whole ring when it is a full trace
    (then every slot of a class gives the same equation)."""
    S = len(z)
    out = np.zeros((len(rows), n), dtype=z.dtype)
    j = np.arange(window)
    for r, t in enumerate(rows):
        u = (t + j) % S
        np.add.at(out[r], u % n, z[u])
    return out


def least_squares_head(sessions: list[tuple[list[np.ndarray], list[np.ndarray]]], n: int, k_pad: int, window: int,
                       d: int, k: int, part: str = "imag") -> np.ndarray:
    """Estimate M [d, k] (the head in slot units) from raw query and result slots by least squares on one part of the
    slots ("imag": every imaginary part, the channel the noise opens; "real": every real part). Each session's
    equations are differenced against its first query, so anything fixed per session (the provider's Enc(0) when it
    was reused, the bias) cancels."""
    S = len(sessions[0][0][0])
    est = np.zeros((d, k))
    take = np.imag if part == "imag" else np.real
    for c in range(k):
        rows = np.arange(c, S, k_pad)
        X, y = [], []
        for queries, results in sessions:
            designs = [window_design(z, n, window, rows) for z in queries]
            X += [take(D - designs[0])[:, :d] for D in designs[1:]]
            y += [take(r[rows] - results[0][rows]) for r in results[1:]]
        est[:, c] = np.linalg.lstsq(np.concatenate(X), np.concatenate(y), rcond=None)[0]
    return est


def logits_only_baseline(inputs: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The minimum-norm least-squares head from q (input, logit) pairs (bias removed by differencing): what the
    protocol's outputs alone give. With q < d it is underdetermined: no information about V outside their span."""
    dx, dy = inputs[1:] - inputs[0], logits[1:] - logits[0]
    return np.linalg.lstsq(dx, dy, rcond=None)[0]


def recovery_error(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(relative Frobenius error, correlation of the entries)."""
    rel = float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))
    if not np.isfinite(estimate).all() or np.std(estimate) == 0:
        return rel, 0.0
    return rel, float(np.corrcoef(estimate.ravel(), truth.ravel())[0, 1])
