"""The two session roles of HELIX: `ClientSession` (secret key, encrypt/decrypt) and `ProviderSession` (a client's
public and rotation keys, evaluation of plans on the client's ciphertexts)."""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence

import numpy as np
import openfhe as fhe

from linalign_jax.errors import LinalignError
from linalign_jax.helix.encoding import check_finite_bounded, decode
from linalign_jax.helix.frames import KIND_BUNDLE, KIND_QUERY, KIND_RESULT, frame, unframe
from linalign_jax.helix import validate
from linalign_jax.helix.keys import KEYS, serialize_rotation_keys
from linalign_jax.helix.presets import SECURE_PRESETS, CkksPreset, context_for, get_preset, preset_of_context_bytes


def check_ciphertext(ct: fhe.Ciphertext, cc: fhe.CryptoContext, key_tag: str, *, level: int, what: str) -> None:
    """Reject a ciphertext that belongs to another context or key, or sits at an unexpected level."""
    ring = ct.GetCryptoContext().GetRingDimension()
    if ring != cc.GetRingDimension():
        raise LinalignError(f"{what}: ring dimension {ring}, expected {cc.GetRingDimension()}")
    if ct.GetCryptoContext() != cc:
        raise LinalignError(f"{what}: ciphertext comes from another crypto context (ring {ring})")
    if ct.GetKeyTag() != key_tag:
        raise LinalignError(f"{what}: encrypted under key {ct.GetKeyTag()[:12]}…, expected this session's key "
                            f"{key_tag[:12]}…")
    if ct.GetLevel() != level or ct.NumberCiphertextElements() != 2:
        raise LinalignError(f"{what}: level {ct.GetLevel()} with {ct.NumberCiphertextElements()} elements, "
                            f"expected level {level} with 2 elements")
    if ct.GetEncodingType() != fhe.CKKS_PACKED_ENCODING or ct.GetSlots() != cc.GetRingDimension() // 2:
        raise LinalignError(f"{what}: not a fully packed CKKS ciphertext ({ct.GetSlots()} slots)")


class _SessionKeys:
    """What ends either party's session: `close` (or leaving its with-block) removes this session's rotation keys from
    the process-global map, once; other sessions keep theirs, and a client's secret key dies with the object."""

    key_tag: str
    _closed: bool

    def close(self) -> None:
        if not self._closed:
            KEYS.remove(self._keys_context(), self.key_tag)
            self._closed = True

    def _keys_context(self) -> fhe.CryptoContext:
        """The crypto context the rotation keys are registered under."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ClientSession(_SessionKeys):
    """The client of one inference session: fresh key pair, rotation keys for exactly one layout, the secret key.

    `layout` is a `linear.LinearLayout` or `bulk.BulkLayout` (which names the preset); it is computed from public
    shapes only, so the client generates exactly the rotation keys the provider's plan will use. `input_bound` is
    public: every input entry must satisfy |x| <= input_bound (checked), and the ciphertexts carry x / input_bound.
    Create one session per inference session: keys are fresh each time (paper §3.3).
    """

    def __init__(self, preset: CkksPreset, layout, input_bound: float, cc: fhe.CryptoContext, keys: fhe.KeyPair):
        self.preset, self.layout, self.input_bound = preset, layout, float(input_bound)
        self._cc, self._keys = cc, keys
        self.key_tag: str = keys.secretKey.GetKeyTag()
        self._closed = False
        # the structure of this session's query ciphertexts, from two of its own encryptions: queries go out packed
        samples = [fhe.Serialize(self._encrypt_slots(np.zeros(preset.slots)), fhe.BINARY) for _ in range(2)]
        self.ciphertext_template = validate.Template.build("ciphertext", *samples, self.key_tag, self.key_tag,
                                                           preset.ring_dim)

    def _keys_context(self) -> fhe.CryptoContext:
        return self._cc

    @classmethod
    def create(cls, layout, input_bound: float) -> "ClientSession":
        """Key generation for one session on the layout's preset, with exactly the layout's rotation keys."""
        if not (np.isfinite(input_bound) and input_bound > 0):
            raise LinalignError(f"input_bound must be a positive finite number, got {input_bound!r}")
        preset = get_preset(layout.preset)
        cc = context_for(preset)
        keys = cc.KeyGen()
        KEYS.generate(cc, keys.secretKey, layout.rotation_indices())
        return cls(preset, layout, input_bound, cc, keys)

    def bundle(self) -> bytes:
        """Context + public key + rotation keys + public session metadata, as one frame for the provider."""
        parts = [fhe.Serialize(self._cc, fhe.BINARY), fhe.Serialize(self._keys.publicKey, fhe.BINARY),
                 serialize_rotation_keys(self._cc, self.key_tag) if self.layout.rotation_indices() else b""]
        header = {"preset": self.preset.name, "layout": self.layout.to_json(), "input_bound": self.input_bound,
                  "key_tag": self.key_tag, "part_sizes": [len(p) for p in parts]}
        return frame(KIND_BUNDLE, header, b"".join(parts))

    # -- linear layouts: one ciphertext per message

    def encrypt(self, x: np.ndarray) -> bytes:
        """Encrypt one query x [d_in] (or up to `layout.queries_per_ciphertext` queries [m, d_in]) in one ciphertext."""
        if self.layout.kind != "linear":
            raise LinalignError(f"encrypt() needs a linear layout; this session's layout is {self.layout.kind!r}")
        x = np.asarray(x, dtype=np.float64)
        queries = x[None] if x.ndim == 1 else x
        if queries.ndim != 2 or queries.shape[1] != self.layout.d_in:
            raise LinalignError(f"query shape {x.shape}, expected [{self.layout.d_in}] or [m, {self.layout.d_in}]")
        if not 1 <= len(queries) <= self.layout.queries_per_ciphertext:
            raise LinalignError(f"{len(queries)} queries in one ciphertext; this layout holds 1.."
                                f"{self.layout.queries_per_ciphertext}")
        scaled = check_finite_bounded(queries, self.input_bound, "query embedding") / self.input_bound
        header = {"key_tag": self.key_tag, "n": len(queries), "single": x.ndim == 1}
        return self._query_frame(header, self.layout.pack_queries(scaled))

    def decrypt(self, result: bytes) -> np.ndarray:
        """Decrypt a provider result into outputs [d_out] (or [m, d_out]), undoing the input and weight scaling."""
        header, values = self._decrypt_result(result)
        outputs = self.layout.unpack_outputs(values, int(header["n"])) * float(header["output_scale"])
        return outputs[0] if header.get("single") else outputs

    # -- bulk (feature-major) layouts: one ciphertext per feature, one result ciphertext per output

    def encrypt_bulk(self, x: np.ndarray, start: int = 0, stop: int | None = None) -> list[bytes]:
        """Encrypt a batch x [n, d_in] (n <= slots) feature-major: frame j holds x[:, j], for j in [start, stop).

        A range lets the client encrypt and stream the features in chunks; the provider takes all d_in frames in order.
        """
        if self.layout.kind != "bulk":
            raise LinalignError(f"encrypt_bulk() needs a bulk layout; this session's layout is {self.layout.kind!r}")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.layout.d_in or not 1 <= len(x) <= self.preset.slots:
            raise LinalignError(f"bulk batch shape {x.shape}, expected [n, {self.layout.d_in}] with "
                                f"1 <= n <= {self.preset.slots}")
        stop = x.shape[1] if stop is None else stop
        if not 0 <= start < stop <= x.shape[1]:
            raise LinalignError(f"feature range [{start}, {stop}) outside [0, {x.shape[1]})")
        scaled = check_finite_bounded(x[:, start:stop], self.input_bound, "bulk embeddings") / self.input_bound
        header = {"key_tag": self.key_tag, "n": len(x)}
        column = np.zeros(self.preset.slots)
        frames = []
        for j in range(stop - start):
            column[: len(x)] = scaled[:, j]
            frames.append(self._query_frame(dict(header, feature=start + j), column))
        return frames

    def query_bytes(self, blob: bytes) -> bytes:
        """The OpenFHE bytes of one of this session's query frames (audits: `audit.py` reads them raw)."""
        header, payload = unframe(blob, KIND_QUERY)
        return self.ciphertext_template.unpack(payload, self.key_tag, "query ciphertext")

    def _encrypt_slots(self, slots: np.ndarray) -> fhe.Ciphertext:
        """A fresh encryption of a full slot vector at scale Δ² (degree 2, three towers)."""
        plaintext = self._cc.MakeCKKSPackedPlaintext(np.asarray(slots, dtype=np.float64).tolist(), 2, 0)
        return self._cc.Encrypt(self._keys.publicKey, plaintext)

    def _query_frame(self, header: dict, slots: np.ndarray) -> bytes:
        packed = self.ciphertext_template.pack(fhe.Serialize(self._encrypt_slots(slots), fhe.BINARY))
        return frame(KIND_QUERY, header, packed)

    def decrypt_bulk(self, results: Sequence[bytes]) -> np.ndarray:
        """Decrypt the d_out result frames of `ProviderSession.evaluate_bulk` into outputs [n, d_out]."""
        if len(results) != self.layout.d_out:
            raise LinalignError(f"{len(results)} bulk result frames, expected d_out={self.layout.d_out}")
        columns = []
        for j, blob in enumerate(results):
            header, values = self._decrypt_result(blob)
            if header.get("output") != j:
                raise LinalignError(f"bulk result frame {j} holds output {header.get('output')}")
            columns.append(values[: int(header["n"])] * float(header["output_scale"]))
        return np.stack(columns, axis=1)

    def _decrypt_result(self, blob: bytes) -> tuple[dict[str, Any], np.ndarray]:
        header, payload = unframe(blob, KIND_RESULT)
        ct = self._load_own(header, payload, "result ciphertext", level=self.preset.depth)
        values = decode(self._cc.Decrypt(ct, self._keys.secretKey), self.preset.slots)
        read = values[self.layout.output_mask(int(header.get("n", 1)))]  # the rest is flood
        if not np.isfinite(read).all() or np.abs(read).max() > self.preset.headroom:
            raise LinalignError(f"result ciphertext decrypts to |value| {np.abs(read).max():.3g} beyond the "
                                f"headroom {self.preset.headroom:.3g}: the provider's scaling is wrong")
        return header, values

    def _load_own(self, header: dict, payload: bytes, what: str, level: int) -> fhe.Ciphertext:
        if header.get("key_tag") != self.key_tag:
            raise LinalignError(f"{what}: made for key {str(header.get('key_tag'))[:12]}…, not this session's key")
        ct = validate.deserialize_ciphertext(payload, what)
        check_ciphertext(ct, self._cc, self.key_tag, level=level, what=what)
        return ct


class ProviderSession(_SessionKeys):
    """The provider's view of one client session: the client's context, public key and rotation keys (by key tag).

    `load` validates everything in the bundle; `evaluate` runs a `linear.LinearPlan` built for the same layout and
    preset, `evaluate_bulk` a `bulk.BulkPlan`.
    """

    def __init__(self, preset: CkksPreset, layout_json: dict, input_bound: float, cc: fhe.CryptoContext,
                 public_key: fhe.PublicKey, key_tag: str, templates: validate.SessionTemplates):
        self.preset, self.layout_json, self.input_bound = preset, layout_json, input_bound
        self.cc, self.public_key, self.key_tag = cc, public_key, key_tag
        self.templates = templates  # what this session's ciphertexts must look like (validate.py)
        self._closed = False
        # OpenFHE re-encodes the plaintext in every EvalMult on a *deserialized* ciphertext (5x slower, measured);
        # anything added onto a locally made ciphertext takes that one's native parameters, so queries are added onto
        # this encryption of zero first.
        self._native_zero = cc.Encrypt(public_key, cc.MakeCKKSPackedPlaintext(np.zeros(preset.slots), 2, 0))

    def _keys_context(self) -> fhe.CryptoContext:
        return self.cc

    @classmethod
    def load(cls, bundle: bytes, allowed_presets: Sequence[str] = SECURE_PRESETS, layout=None) -> "ProviderSession":
        """Validate and load a client bundle: frame, preset (ring/moduli), layout, then the key material checked
        against honest templates (validate.py) BEFORE OpenFHE parses it; rotation keys are registered last, so a
        bundle that fails anywhere registers nothing. `layout` is the layout the provider expects (a provider must
        pass it: templates are built per layout); without it the bundle's own layout is used (in-process tests)."""
        header, payload = unframe(bundle, KIND_BUNDLE)
        try:
            sizes = [int(s) for s in header["part_sizes"]]
            preset_name, layout_json = str(header["preset"]), dict(header["layout"])
            input_bound, key_tag = float(header["input_bound"]), str(header["key_tag"])
        except (KeyError, TypeError, ValueError) as e:
            raise LinalignError(f"session bundle: header field missing or malformed ({e!r})") from None
        if len(sizes) != 3 or sum(sizes) != len(payload) or min(sizes) < 0:
            raise LinalignError(f"session bundle: part sizes {sizes} do not add up to the payload ({len(payload)} B)")
        if preset_name not in allowed_presets:
            raise LinalignError(f"session bundle: preset {preset_name!r} not allowed here; expected one of "
                                f"{list(allowed_presets)}")
        if not (np.isfinite(input_bound) and input_bound > 0):
            raise LinalignError(f"session bundle: input_bound {input_bound!r} is not a positive finite number")
        cc_bytes, pk_bytes, rk_bytes = (payload[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(3))
        preset = preset_of_context_bytes(cc_bytes, allowed_presets)
        cc = context_for(preset)
        if preset.name != preset_name:
            raise LinalignError(f"session bundle: context is preset {preset.name}, header says {preset_name}")
        layout = validate.layout_from_json(layout_json) if layout is None else layout
        if layout_json != layout.to_json() or layout.preset != preset.name:
            raise LinalignError(f"key bundle was made for layout {layout_json}, but this session needs "
                                f"{layout.to_json()}")
        templates = validate.check_key_material(layout, key_tag, pk_bytes, rk_bytes)
        public_key = validate.parse_public_key(pk_bytes)
        if public_key.GetKeyTag() != key_tag:
            raise LinalignError(f"session bundle: public key tag {public_key.GetKeyTag()[:12]}… differs from the "
                                f"header's {key_tag[:12]}…")
        session = cls(preset, layout_json, input_bound, cc, public_key, key_tag, templates)
        KEYS.add_serialized(cc, key_tag, rk_bytes)  # last: nothing is registered for a bundle that fails
        return session

    def require_rotations(self, rotations: Sequence[int]) -> None:
        """Raise naming the rotation indices whose keys this session lacks."""
        have = set(self.cc.GetExistingEvalAutomorphismKeyIndices(self.key_tag))
        missing = sorted(r for r in rotations if self.cc.FindAutomorphismIndex(int(r)) not in have)
        if missing:
            raise LinalignError(f"session {self.key_tag[:12]}… lacks rotation keys for indices {missing}")

    def evaluate(self, plan, query: bytes) -> bytes:
        """Evaluate a `LinearPlan` on one query frame; returns a result frame holding one sanitized 1-tower
        ciphertext."""
        acc, n, single = self.accumulate(plan, query)
        return self.finish(plan, acc, n, single)

    def accumulate(self, plan, query: bytes, acc: fhe.Ciphertext | None = None) -> tuple[fhe.Ciphertext, int, bool]:
        """(acc + plan.transform(query), queries in the frame, single-query flag): the unsanitized two-tower sum,
        which never leaves the provider (the secure fit adds its sample blocks this way).

        Holds the key registry's shared lock throughout, so no key-map change (another session loading or closing)
        can interleave with the rotations."""
        header, payload = unframe(query, KIND_QUERY)
        with KEYS.lock.shared():
            self._check_plan(plan)
            ct = self._load(header, payload, "query ciphertext", level=0)
            n = int(header.get("n", 1))
            if not 1 <= n <= plan.layout.queries_per_ciphertext:
                raise LinalignError(f"query frame claims {n} queries; the layout holds "
                                    f"1..{plan.layout.queries_per_ciphertext}")
            part = plan.transform(self.cc, ct)
        return (part if acc is None else self.cc.EvalAdd(acc, part)), n, bool(header.get("single", False))

    def finish(self, plan, acc: fhe.Ciphertext, n: int = 1, single: bool = True) -> bytes:
        """The sanitized result frame of an `accumulate` sum (bias, fresh re-encryption, flooding, one tower)."""
        result, output_scale = plan.finish(self.cc, self.public_key, acc, self.input_bound, n)
        out_header = {"key_tag": self.key_tag, "n": n, "single": single, "output_scale": output_scale}
        return frame(KIND_RESULT, out_header, fhe.Serialize(result, fhe.BINARY))

    def evaluate_bulk(self, plan, queries: Sequence[bytes], chunk: int = 256) -> list[bytes]:
        """Evaluate a `BulkPlan` on the d_in feature frames of `ClientSession.encrypt_bulk`; one frame per output."""
        if len(queries) != plan.layout.d_in:
            raise LinalignError(f"{len(queries)} bulk feature frames, expected d_in={plan.layout.d_in}")
        return self.evaluate_bulk_stream(plan, (queries[i:i + chunk] for i in range(0, len(queries), chunk)))

    def evaluate_bulk_stream(self, plan, frame_chunks: Iterable[Sequence[bytes]]) -> list[bytes]:
        """`evaluate_bulk` on feature frames arriving in consecutive chunks (a served bulk call streams them), so the
        provider holds one chunk of inputs at a time."""
        with KEYS.lock.shared():
            self._check_plan(plan)
        frame_chunks = iter(frame_chunks)
        first = next(frame_chunks, None)
        if not first:
            raise LinalignError("a bulk call carried no feature frames")
        n = unframe(first[0], KIND_QUERY)[0].get("n")
        if not isinstance(n, int) or isinstance(n, bool):
            raise LinalignError(f"bulk frame 0 gives n={str(n)[:20]}, not a query count")
        position = [0]

        def load(blob: bytes) -> fhe.Ciphertext:
            j = position[0]
            header, payload = unframe(blob, KIND_QUERY)
            if header.get("feature") != j:
                raise LinalignError(f"bulk frame {j} holds feature {str(header.get('feature'))[:20]}")
            if header.get("n") != n:
                raise LinalignError(f"bulk frame {j} holds {str(header.get('n'))[:20]} queries, frame 0 holds {n}")
            if j >= plan.layout.d_in:
                raise LinalignError(f"bulk call carries more than d_in={plan.layout.d_in} feature frames")
            position[0] += 1
            return self._load(header, payload, f"bulk feature {j} ciphertext", level=0)

        chunks = ([load(blob) for blob in chunk] for chunk in itertools.chain([first], frame_chunks))
        results, output_scale = plan.apply(self.cc, self.public_key, chunks, self.input_bound, n)
        return [frame(KIND_RESULT, {"key_tag": self.key_tag, "n": n, "output": j, "output_scale": output_scale},
                      fhe.Serialize(ct, fhe.BINARY)) for j, ct in enumerate(results)]

    def _check_plan(self, plan) -> None:
        if self._closed:
            raise LinalignError(f"session {self.key_tag[:12]}… is closed")
        if plan.preset.name != self.preset.name:
            raise LinalignError(f"plan encoded for preset {plan.preset.name}, session uses {self.preset.name}")
        if plan.layout.to_json() != self.layout_json:
            raise LinalignError(f"plan layout {plan.layout.to_json()} differs from the session's {self.layout_json}")
        self.require_rotations(plan.layout.rotation_indices())

    def _load(self, header: dict, payload: bytes, what: str, level: int) -> fhe.Ciphertext:
        if header.get("key_tag") != self.key_tag:
            raise LinalignError(f"{what}: made for key {str(header.get('key_tag'))[:12]}…, not this session's key "
                                f"{self.key_tag[:12]}…")
        ct = validate.parse_ciphertext(self.templates.ciphertext, payload, self.key_tag, what)
        check_ciphertext(ct, self.cc, self.key_tag, level=level, what=what)
        return self.cc.EvalAdd(self._native_zero, ct)
