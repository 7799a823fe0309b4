"""HELIX CKKS engine (OpenFHE): encrypted affine layers y = x A + a evaluated by a provider on a client's ciphertext.

The engine is transport-free: every value that crosses the wire is `bytes` (framed, checksummed, validated on load),
so `linalign_jax.serve` only moves bytes. Two roles:

Client (holds the secret key; one `ClientSession` per inference session, fresh keys each time, paper §3.3)::

    layout = plan_layout(d_in=768, d_out=20)                    # public shapes only
    client = ClientSession.create(layout, input_bound=64.0)     # keygen with exactly layout.rotation_indices()
    bundle = client.bundle()                                    # context + public key + rotation keys -> bytes
    query = client.encrypt(x)                                   # x [d_in], or [m, d_in] if the layout packs m
    logits = client.decrypt(result)                             # [d_out] (or [m, d_out]); undoes all scaling

Provider (never sees a secret key; a plan is encoded once per model and ring, and serves every session)::

    plan = LinearPlan.build(layout, A, a)         # head: A=V [d,k], a=c; map: A=W, a=b (the layout names the preset)
    session = ProviderSession.load(bundle)        # validates ring, preset, keys, layout
    result = session.evaluate(plan, query)        # -> one sanitized 1-tower ciphertext (fresh Enc_pk(0) + flood)

Bulk, feature-major (thousands of queries, no rotation keys): `BulkLayout`, `BulkPlan`, `ClientSession.encrypt_bulk`,
`ProviderSession.evaluate_bulk`, `ClientSession.decrypt_bulk`.

Every returned ciphertext is sanitized (`sanitize.py`: the argument, λ, the bound B and the flood widths).

Modules, one concern each: `presets` (parameter sets, contexts), `frames` (the wire frame), `keys` (the registry of
OpenFHE's global rotation-key map), `encoding` (bound checks, decoding), `sanitize` (re-randomization and flooding of
results), `sessions` (client and provider roles), `linear` (layouts and BSGS plans), `bulk` (feature-major plans),
`protocol` (the two parties' messages), `audit` (raw decryption for the red-team harness and tests). Importing this
package imports OpenFHE (CPython 3.10 only).
"""
from linalign_jax.helix.bulk import BulkLayout, BulkPlan
from linalign_jax.helix.linear import LinearLayout, LinearPlan, plan_layout
from linalign_jax.helix.presets import PRESETS, CkksPreset, choose_preset
from linalign_jax.helix.sessions import ClientSession, ProviderSession

__all__ = [
    "PRESETS",
    "BulkLayout",
    "BulkPlan",
    "CkksPreset",
    "ClientSession",
    "LinearLayout",
    "LinearPlan",
    "ProviderSession",
    "choose_preset",
    "plan_layout",
]
