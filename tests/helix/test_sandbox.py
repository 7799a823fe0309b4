"""The validation sandbox contains the crashes the adversarial review found: the worker dies, the caller gets a
LinalignError naming the signal, and the next job runs in a fresh worker."""
import pytest

pytest.importorskip("openfhe")

from linalign_jax.errors import LinalignError  # noqa: E402
from linalign_jax.helix import ClientSession, plan_layout  # noqa: E402
from linalign_jax.helix.frames import KIND_BUNDLE, unframe  # noqa: E402
from linalign_jax.helix.sandbox import Sandbox  # noqa: E402
from tests.helix.conftest import TEST_PRESET  # noqa: E402


def test_crashing_key_material_costs_one_job_not_the_caller():
    layout = plan_layout(64, 6, preset=TEST_PRESET)
    with ClientSession.create(layout, 1.0) as client:
        header, payload = unframe(client.bundle(), KIND_BUNDLE)
        a, b, _ = header["part_sizes"]
        pk, rk = payload[a:a + b], payload[a + b:]
        tag, rotations = client.key_tag, layout.rotation_indices()
    sandbox = Sandbox()
    try:
        sandbox.check(layout.preset, rotations, tag, pk, rk)
        abort = bytearray(rk)
        abort[208:216] = b"\xff" * 8  # as the audit's rotation-key abort (8 bytes of 0xFF in a header): SIGSEGV here
        with pytest.raises(LinalignError, match=r"validation sandbox was killed by signal (6|11) \(SIG(ABRT|SEGV)\); refused"):
            sandbox.check(layout.preset, rotations, tag, pk, bytes(abort))
        segv = bytearray(pk)
        segv[700:1240] = bytes(540)  # a zeroed region of the public key (an array header) -> SIGSEGV in Encrypt
        with pytest.raises(LinalignError, match=r"killed by signal (6|11) \(SIG(ABRT|SEGV)\)"):
            sandbox.check(layout.preset, rotations, tag, bytes(segv), rk)
        sandbox.check(layout.preset, rotations, tag, pk, rk)  # a fresh worker takes the next job
        assert sandbox.crashes == 2
    finally:
        sandbox.close()
