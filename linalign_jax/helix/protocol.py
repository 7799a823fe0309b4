"""HELIX between two parties (paper §3): message fields and both parties' math, independent of the transport.

Inference (§3.3). The provider serves named heads y = z V + c: "base" is its trained head, and every secure fit
registers one more (see below). The client opens a session with a fresh key bundle made for the head's public layout,
sends `ClientSession.encrypt(z)` frames and decrypts the returned logits.

Secure map fit (§3.2). Both parties hold embeddings of the same public set, in the same order: Z_A (provider, d_A)
and Z_B (client, d_B). Packing, chosen to reuse the provider's fastest operator:

* the client centres its columns and encrypts them feature-major, one ciphertext per column j and block of S ≤ slots
  samples: x_j = Z̃_B[block, j];
* blocks are balanced: B = ceil(N / slots) blocks of S = ceil(N / B) samples (N = 4097 gives 2049 + 2048);
* for every block the provider encodes ONE plan for the affine layer "samples → its d_A features" with A = Z̃_A[block]
  (centred), all blocks under ONE weight scale, and evaluates it on every column ciphertext of that block: the hybrid
  diagonal BSGS operator of `linear.py` (ciphertext × plaintext products, additions, ~2√k rotations per column, the
  plaintexts encoded once per block, the rotation keys uploaded once). It adds the block results of each column
  homomorphically and returns ONE sanitized ciphertext per column (`sanitize.py`): Enc(x_jᵀ Z̃_A), row j of
  Enc(Z̃_Bᵀ Z̃_A), with nothing of any single block — or single provider row — left in it for any N;
* the client decrypts and solves the ridge locally with its own Z̃_Bᵀ Z̃_B.

b* is handled without revealing mean(Z_A): with both sides centred, W* maps centred B to centred A, and
b* = mean(Z_A) − mean(Z_B) W* splits into −mean(Z_B) W* (kept by the client in its map) and mean(Z_A) (folded by the
provider into the bias of the head it registers for this fit: c' = c + mean(Z_A) V). Logits are identical to those of
a plaintext ridge map with the base head.

Rank r (optional): each party first projects its centred embeddings on its own top-r principal directions (P_A, P_B);
the client's map is z ↦ (z − mean_B) P_B W_r and the provider's fitted head is (P_Aᵀ V, c + mean(Z_A) V), so neither
basis leaves its owner. The fit then costs r column ciphertexts of an [S → r] plan instead of d_B of [S → d_A].

What each party learns: the provider learns N, S, the number of columns, r, the client's `input_bound` and ciphertexts.
The client learns the (reduced) centred cross-covariance Z̃_Bᵀ Z̃_A (the sum over all blocks), tr(Z̃_Aᵀ Z̃_A) in the
fitted basis (one scalar, for λ selection by GCV), d_A, and — as in the paper — the map W* it solves for.
"""
from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from linalign_jax.errors import LinalignError
from linalign_jax.helix.bulk import BulkLayout, BulkPlan
from linalign_jax.helix.encoding import input_bound
from linalign_jax.helix.frames import require  # the one typed-field validator (frames.py)
from linalign_jax.helix.keys import KEYS
from linalign_jax.helix.linear import VALUE_BUDGET_FRACTION, LinearLayout, LinearPlan, plan_layout, weight_scale
from linalign_jax.helix.presets import get_preset
from linalign_jax.helix.sessions import ClientSession, ProviderSession
from linalign_jax.io_utils import Progress

PROTOCOL_VERSION = 1
MAX_CACHED_PLANS = 8  # encoded plans of fitted head variants kept in memory
BASE_HEAD = "base"
MAX_QUERIES_PER_CALL = 64
FLUSH_BELOW = 1e-9  # relative to the input bound; CKKS resolves about 1e-7 of it at ScalingModSize 40


# ------------------------------------------------------------------------------------------------------ provider


@dataclasses.dataclass(frozen=True)
class ServedHead:
    """A head y = z V + c the provider evaluates under encryption; `labels` name the k classes."""

    V: np.ndarray  # [d, k]
    c: np.ndarray  # [k]
    labels: tuple[str, ...]

    def __post_init__(self):
        V, c = np.asarray(self.V, np.float64), np.asarray(self.c, np.float64)
        if V.ndim != 2 or c.shape != (V.shape[1],) or len(self.labels) != V.shape[1]:
            raise LinalignError(f"head V {V.shape}, c {c.shape} and {len(self.labels)} labels disagree; expected "
                                f"V [d, k], c [k], k labels")
        if not (np.isfinite(V).all() and np.isfinite(c).all()):
            raise LinalignError("head weights contain non-finite values")
        object.__setattr__(self, "V", V)
        object.__setattr__(self, "c", c)

    @property
    def dims(self) -> tuple[int, int]:
        return self.V.shape


@dataclasses.dataclass(frozen=True)
class PublicEmbeddings:
    """The provider's embeddings of the public set, with its principal axes (computed once, float64)."""

    name: str
    Z: np.ndarray  # [N, d_A]
    mean: np.ndarray
    axes: np.ndarray  # [d_A, d_A] eigenvectors of the centred covariance, by decreasing eigenvalue
    variances: np.ndarray  # [d_A] eigenvalues of Z̃ᵀZ̃ (sums of squares), decreasing

    @classmethod
    def from_array(cls, name: str, Z: np.ndarray) -> "PublicEmbeddings":
        Z = np.asarray(Z, np.float64)
        if Z.ndim != 2 or len(Z) < 2 or not np.isfinite(Z).all():
            raise LinalignError(f"public-set embeddings must be a finite [N >= 2, d] array, got shape {Z.shape}")
        mean = Z.mean(0)
        centred = Z - mean
        evals, evecs = np.linalg.eigh(centred.T @ centred)
        order = np.argsort(evals)[::-1]
        return cls(name, Z, mean, evecs[:, order], np.clip(evals[order], 0.0, None))

    def basis(self, rank: int) -> np.ndarray:
        """[d_A, r] projection (identity for full rank, so full-rank fits stay in A's own coordinates)."""
        return np.eye(self.Z.shape[1]) if rank == 0 else self.axes[:, :rank]


@dataclasses.dataclass
class _QueryState:
    session: ProviderSession
    plan: LinearPlan | BulkPlan  # BulkPlan: a bulk session (purpose "bulk")
    head: str


@dataclasses.dataclass
class _FitState:
    session: ProviderSession
    rank: int  # 0 = full
    block: int
    layout: LinearLayout


class ProviderCore:
    """The provider's side of HELIX: heads and their plans, session setup from key bundles, queries, secure fits.

    `fitted_heads` persists head variants registered by secure fits (name -> ServedHead); pass a dict-like store
    (e.g. `serve.heads.HeadStore`) so they survive restarts.
    """

    def __init__(self, head: ServedHead, *, public: PublicEmbeddings | None = None,
                 fitted_heads: Any | None = None, preset: str | None = None, fit_block: int = 4096):
        self._heads = fitted_heads if fitted_heads is not None else {}
        self._base = head
        self.public = public
        if public is not None and public.Z.shape[1] != head.dims[0]:
            raise LinalignError(f"public-set embeddings have dim {public.Z.shape[1]}, the head expects "
                                f"{head.dims[0]}")
        slots = get_preset(preset).slots if preset else fit_block
        cap = min(fit_block, slots)
        n = cap if public is None else len(public.Z)
        self.fit_block = -(-n // -(-n // cap))  # balanced: ceil(N / B) samples in each of B = ceil(N / cap) blocks
        # None: the smallest 128-bit ring per layout. A named preset (tests use a small insecure ring) is then the
        # only one this provider accepts from clients.
        self.preset = preset
        self._allowed = {} if preset is None else {"allowed_presets": (preset,)}
        # Encoded plans are large (one plaintext per diagonal): the base head's stays, fitted heads' are evicted
        # least recently used beyond MAX_CACHED_PLANS (a live session keeps its own plan object).
        self._plans: collections.OrderedDict[str, LinearPlan] = collections.OrderedDict()
        self._plan_lock = threading.Lock()
        self._plan(BASE_HEAD)  # encode the base head now rather than inside the first client's call

    # -- public facts

    def head(self, name: str) -> ServedHead:
        if name == BASE_HEAD:
            return self._base
        try:
            return self._heads[name]
        except KeyError:
            raise LinalignError(f"the provider has no head {name!r} (a map fitted with another provider, or a "
                                f"provider restarted without its state dir?)") from None

    def describe(self) -> dict[str, Any]:
        d, k = self._base.dims
        info = {"protocol": PROTOCOL_VERSION, "preset": self.preset, "head": {"name": BASE_HEAD, "d": d, "k": k,
                                                     "labels": list(self._base.labels)}}
        if self.public is not None:
            info["fit"] = {"public_set": self.public.name, "n": len(self.public.Z), "d": d, "block": self.fit_block,
                           "preset": self.preset}
        return info

    # -- sessions

    def open_session(self, fields: Mapping[str, Any], blobs: Sequence[bytes]) -> tuple[Any, str]:
        purpose = require(fields, "purpose", str)
        if purpose not in ("query", "fit", "bulk"):
            raise LinalignError(f"session purpose must be 'query', 'fit' or 'bulk', got {str(purpose)[:40]!r}")
        if len(blobs) != 1:
            raise LinalignError(f"open_session carries {len(blobs)} payloads; expected exactly one key bundle")
        if purpose == "query":
            name = require(fields, "head", str)
            plan = self._plan(name)
            layout = plan.layout
        elif purpose == "bulk":
            name = require(fields, "head", str)
            head = self.head(name)
            layout = BulkLayout(*head.dims, **({"preset": self.preset} if self.preset else {}))
            plan = BulkPlan.build(layout, head.V, head.c)  # scalars only: cheap per session
        else:
            rank = self._check_rank(require(fields, "rank", int))
            layout = plan_layout(self.fit_block, rank or self._base.dims[0], self.preset)
        # No lock here: the key registry (keys.py) takes its own lock to change OpenFHE's global key map.
        session = ProviderSession.load(blobs[0], layout=layout, **self._allowed)
        try:
            with KEYS.lock.shared():
                session.require_rotations(layout.rotation_indices())
        except LinalignError:
            self.release_session(session)
            raise
        if purpose in ("query", "bulk"):
            return _QueryState(session, plan, name), purpose
        return _FitState(session, rank, self.fit_block, layout), purpose

    def release(self, state: Any) -> None:
        self.release_session(state.session)

    def release_session(self, session: ProviderSession) -> None:
        session.close()

    def bulk(self, state: Any, start: Mapping[str, Any], batches: Iterator[tuple[Mapping[str, Any], Sequence[bytes]]],
             *, max_reply_bytes: int) -> Iterator[tuple[dict, list[bytes]]]:
        """Served bulk inference: feature frames of up to `slots` queries streamed in, the k sanitized result frames
        out (feature-major packing, no rotation keys; see `bulk.py`)."""
        if not isinstance(state, _QueryState) or not isinstance(state.plan, BulkPlan):
            raise LinalignError("this session was not opened for bulk queries (purpose 'bulk')")
        results = state.session.evaluate_bulk_stream(state.plan, (blobs for _, blobs in batches))
        yield from _chunks({"head": state.head, "outputs": len(results)}, results, max_reply_bytes)

    def query(self, state: Any, fields: Mapping[str, Any], blobs: Sequence[bytes]) -> tuple[dict, list[bytes]]:
        if not isinstance(state, _QueryState) or isinstance(state.plan, BulkPlan):
            raise LinalignError("this session was opened for a fit or for bulk calls, not for single queries")
        if not 1 <= len(blobs) <= MAX_QUERIES_PER_CALL:
            raise LinalignError(f"a query call carries {len(blobs)} ciphertexts; expected 1..{MAX_QUERIES_PER_CALL}")
        return {"head": state.head}, [state.session.evaluate(state.plan, blob) for blob in blobs]

    # -- secure fit

    def fit(self, state: Any, start: Mapping[str, Any], batches: Iterator[tuple[Mapping[str, Any], Sequence[bytes]]],
            *, max_reply_bytes: int) -> Iterator[tuple[dict, list[bytes]]]:
        """Consume the client's column ciphertexts block by block; yield the result messages (see module doc)."""
        if not isinstance(state, _FitState):
            raise LinalignError("this session was opened for queries, not for a fit")
        public = self.public
        if public is None:
            raise LinalignError("this provider serves no public set, so it cannot take part in a secure fit")
        if require(start, "public_set", str) != public.name or require(start, "n", int) != len(public.Z):
            raise LinalignError(f"the client fits on public set {start.get('public_set')!r} with "
                                f"n={start.get('n')!r}; the provider holds {public.name!r} with n={len(public.Z)}")
        columns = require(start, "columns", int)
        if not 1 <= columns <= 65536:
            raise LinalignError(f"fit columns must be in 1..65536, got {columns}")
        n, S = len(public.Z), state.block
        n_blocks = -(-n // S)
        basis = public.basis(state.rank)
        centred = (public.Z - public.mean) @ basis
        # one scale for every block, so that their results add up: it bounds the 1-norm over all N samples
        budget = get_preset(state.layout.preset).headroom * VALUE_BUDGET_FRACTION
        scale = weight_scale(np.abs(centred).sum(axis=0), budget)
        name = f"fit-{secrets.token_hex(8)}"
        trace = float(public.variances[: state.rank].sum() if state.rank else public.variances.sum())
        summary = {"head": name, "d": int(basis.shape[1]), "blocks": n_blocks, "columns": columns,
                   "target_trace": trace}
        sums: dict[int, Any] = {}
        seen: set[tuple[int, int]] = set()
        plan, plan_block, sent, part = None, -1, 0, 0
        progress = Progress("secure fit (provider)", n_blocks * columns, "ciphertexts")
        for fields, blobs in batches:
            block, cols = require(fields, "block", int), require(fields, "columns", list)
            if not 0 <= block < n_blocks or block < plan_block:
                raise LinalignError(f"fit batch for block {block}: blocks must arrive in order within 0..{n_blocks - 1}")
            if len(cols) != len(blobs) or not all(isinstance(j, int) and 0 <= j < columns for j in cols):
                raise LinalignError(f"fit batch lists columns {cols[:8]}… for {len(blobs)} ciphertexts; expected one "
                                    f"column index in 0..{columns - 1} per ciphertext")
            if block != plan_block:
                missing = [j for j in range(columns) if (plan_block, j) not in seen] if plan_block >= 0 else []
                if missing:
                    raise LinalignError(f"fit block {plan_block} ended without columns {missing[:8]}")
                A = np.zeros((S, basis.shape[1]))
                rows = centred[block * S:(block + 1) * S]
                A[: len(rows)] = rows
                plan, plan_block = LinearPlan.build(state.layout, A, scale=scale), block
            finished = []
            for j, blob in zip(cols, blobs):
                if (block, j) in seen:
                    raise LinalignError(f"fit column {j} of block {block} was sent twice")
                seen.add((block, j))
                sums[j] = state.session.accumulate(plan, blob, sums.get(j))[0]
                if block == n_blocks - 1:  # the column is complete: sanitize it, drop the sum
                    finished.append(state.session.finish(plan, sums.pop(j)))
            progress.update(len(blobs))
            if finished:
                if len(seen) == n_blocks * columns:  # the last ciphertexts: the head exists before they are sent
                    self._heads[name] = ServedHead(basis.T @ self._base.V,
                                                   self._base.c + public.mean @ self._base.V, self._base.labels)
                for message in _chunks(summary, finished, max_reply_bytes, first_part=part, offset=sent):
                    part += 1
                    yield message
                sent += len(finished)
        progress.close()
        if len(seen) != n_blocks * columns:
            raise LinalignError(f"fit ended after {len(seen)} of {n_blocks * columns} column ciphertexts")

    # -- internals

    def _plan(self, name: str) -> LinearPlan:
        with self._plan_lock:
            if name not in self._plans:
                head = self.head(name)
                self._plans[name] = LinearPlan.build(plan_layout(*head.dims, self.preset), head.V, head.c)
                fitted = [n for n in self._plans if n != BASE_HEAD]
                for old in fitted[:max(0, len(fitted) - MAX_CACHED_PLANS)]:
                    del self._plans[old]
            self._plans.move_to_end(name)
            return self._plans[name]

    def _check_rank(self, rank: int) -> int:
        if self.public is None:
            raise LinalignError("this provider serves no public set, so it cannot take part in a secure fit")
        limit = min(self._base.dims[0], len(self.public.Z) - 1)
        if not 0 <= rank <= limit:
            raise LinalignError(f"fit rank must be 0 (full) or 1..{limit}, got {rank}")
        return rank


def _chunks(summary: dict, blobs: list[bytes], max_bytes: int, first_part: int = 0,
            offset: int = 0) -> Iterator[tuple[dict, list[bytes]]]:
    """Split result ciphertexts into messages below `max_bytes`, numbered from `first_part`, each carrying the summary
    and the index (`offset`) of its first ciphertext among all of the fit's results."""
    current: list[bytes] = []
    size, part = 0, first_part
    for blob in blobs:
        if current and size + len(blob) > max_bytes:
            yield {**summary, "part": part, "offset": offset}, current
            part, offset, current, size = part + 1, offset + len(current), [], 0
        current.append(blob)
        size += len(blob)
    if current:
        yield {**summary, "part": part, "offset": offset}, current


# -------------------------------------------------------------------------------------------------------- client


# Key generation, bundling and closing touch OpenFHE's process-global rotation-key map; a client process running
# several sessions at once (threads) must not interleave them.
_CLIENT_KEYS = threading.Lock()


class _ClientKeys:
    """Fresh keys for one layout, created, serialized and dropped under `_CLIENT_KEYS`."""

    def __init__(self, layout: LinearLayout, input_bound: float):
        self.layout = layout
        with _CLIENT_KEYS:
            self.crypto = ClientSession.create(layout, input_bound)

    def bundle(self) -> bytes:
        with _CLIENT_KEYS:
            return self.crypto.bundle()

    def close(self) -> None:
        with _CLIENT_KEYS:
            self.crypto.close()


class QueryClient(_ClientKeys):
    """The client's side of one inference session on a named head: fresh keys, encrypt, decrypt."""

    def __init__(self, d: int, k: int, input_bound: float, head: str = BASE_HEAD, preset: str | None = None):
        self.head = head
        # the provider derives the same layout from its head's shape
        super().__init__(plan_layout(d, k, preset), input_bound)

    def open_fields(self) -> dict[str, Any]:
        return {"purpose": "query", "head": self.head}

    def encrypt(self, z: np.ndarray) -> bytes:
        return self.crypto.encrypt(z)

    def decrypt(self, blob: bytes) -> np.ndarray:
        return self.crypto.decrypt(blob)


class BulkClient(_ClientKeys):
    """The client's side of a bulk session on a named head: queries packed feature-major, up to `slots` per call."""

    def __init__(self, d: int, k: int, input_bound: float, head: str = BASE_HEAD, preset: str | None = None):
        self.head = head
        super().__init__(BulkLayout(d, k, **({"preset": preset} if preset else {})), input_bound)

    @property
    def slots(self) -> int:
        return self.layout.slots

    def open_fields(self) -> dict[str, Any]:
        return {"purpose": "bulk", "head": self.head}

    def batches(self, Z: np.ndarray, features_per_message: int) -> Iterator[tuple[dict, list[bytes]]]:
        """Feature frames of the queries Z [n <= slots, d], encrypted lazily as the stream drains."""
        for start in range(0, Z.shape[1], features_per_message):
            stop = min(start + features_per_message, Z.shape[1])
            yield {"features": [start, stop]}, self.crypto.encrypt_bulk(Z, start, stop)

    def decrypt(self, results: Sequence[bytes]) -> np.ndarray:
        return self.crypto.decrypt_bulk(results)


class SecureFitClient(_ClientKeys):
    """The client's side of a secure fit: centre (and project) its public-set embeddings, encrypt them column by
    column, then turn the decrypted cross-covariance into a ridge map (see the module doc)."""

    def __init__(self, Z_B: np.ndarray, fit_info: Mapping[str, Any], *, rank: int = 0, batch_columns: int = 8):
        Z_B = np.asarray(Z_B, np.float64)
        n, S, d_A = int(fit_info["n"]), int(fit_info["block"]), int(fit_info["d"])
        if Z_B.ndim != 2 or len(Z_B) != n or not np.isfinite(Z_B).all():
            raise LinalignError(f"client public-set embeddings have shape {Z_B.shape}; the provider's public set "
                                f"{fit_info['public_set']!r} has n={n} rows (same samples, same order)")
        if not 0 <= rank <= min(Z_B.shape[1], d_A, n - 1):
            raise LinalignError(f"fit rank must be 0 (full) or 1..{min(Z_B.shape[1], d_A, n - 1)}, got {rank}")
        self.fit_info, self.rank, self.batch_columns = dict(fit_info), rank, batch_columns
        self.mean = Z_B.mean(0)
        centred = Z_B - self.mean
        gram = centred.T @ centred
        if rank:
            evals, evecs = np.linalg.eigh(gram)
            order = np.argsort(evals)[::-1][:rank]
            self.basis = evecs[:, order]
            self.X = centred @ self.basis
            self.gram = np.diag(np.clip(evals[order], 0.0, None))
        else:
            self.basis, self.X, self.gram = np.eye(Z_B.shape[1]), centred, gram
        self.block, self.n_blocks = S, -(-n // S)
        self.input_bound = input_bound(self.X)
        # Entries far below CKKS precision (e.g. a constant feature after centring) carry nothing, and OpenFHE refuses
        # to encode a vector whose largest entry is below its scale: flush them to exact zeros.
        self.X[np.abs(self.X) < self.input_bound * FLUSH_BELOW] = 0.0
        super().__init__(plan_layout(S, rank or d_A, fit_info.get("preset")), self.input_bound)

    def open_fields(self) -> dict[str, Any]:
        return {"purpose": "fit", "rank": self.rank}

    def start_fields(self) -> dict[str, Any]:
        return {"public_set": self.fit_info["public_set"], "n": len(self.X), "columns": self.X.shape[1]}

    def batches(self) -> Iterator[tuple[dict, list[bytes]]]:
        """Block-major, `batch_columns` column ciphertexts per message, encrypted lazily as the stream drains."""
        S, cols = self.block, self.X.shape[1]
        for b in range(self.n_blocks):
            rows = np.zeros((S, cols))
            part = self.X[b * S:(b + 1) * S]
            rows[: len(part)] = part
            for start in range(0, cols, self.batch_columns):
                js = list(range(start, min(start + self.batch_columns, cols)))
                yield {"block": b, "columns": js}, [self.crypto.encrypt(rows[:, j]) for j in js]

    def solve(self, replies: Iterable[tuple[Mapping[str, Any], Sequence[bytes]]], lam: float | str = "auto"):
        """(AffineMap, info) from the provider's result messages; raises if any part is missing."""
        from linalign_jax.align.maps import AffineMap
        from linalign_jax.align.ridge import Eigensystem, ridge_weights, select_lambda

        cols, summary, blobs = self.X.shape[1], None, []
        for fields, part in replies:
            if summary is None:
                summary = dict(fields)
            if fields.get("offset") != len(blobs) or fields.get("head") != summary["head"]:
                raise LinalignError(f"fit result part {fields.get('part')} is out of order or from another fit")
            blobs.extend(part)
        if summary is None or len(blobs) != cols or summary.get("columns") != cols:
            raise LinalignError(f"the fit returned {len(blobs)} of {cols} result ciphertexts (one per column); "
                                f"no map is produced from a partial fit")
        cross = np.stack([self.crypto.decrypt(blob) for blob in blobs])  # the provider summed the blocks
        evals, Q = np.linalg.eigh(self.gram)
        eig = Eigensystem(evals=np.clip(evals, 0.0, None), Q=Q, R=Q.T @ cross,
                          yy_trace=float(summary["target_trace"]), n=float(len(self.X)))
        lam, lam_info = select_lambda(eig, lam)
        W = self.basis @ ridge_weights(eig, lam)
        affine = AffineMap(W=W.astype(np.float32), b=(-self.mean @ W).astype(np.float32))
        info = {"method": "helix_secure_ridge", "rank": self.rank, "helix_head": summary["head"],
                "public_set": self.fit_info["public_set"], "n_public": len(self.X), "blocks": self.n_blocks,
                "target": "provider head variant (centred coordinates)", **lam_info}
        return affine, info
