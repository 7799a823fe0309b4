"""Shared HELIX fixtures. Most tests use the `insecure_n4096` preset (ring 4096, HEStd_NotSet): same moduli as the
production preset, a quarter of the cost; security is irrelevant to what they check. Tests that need the real
128-bit preset say so."""
import numpy as np
import pytest

try:  # the CKKS engine runs on CPython 3.10 only: without openfhe (the GPU image) every module here skips itself
    from linalign_jax.helix import ClientSession, LinearPlan, ProviderSession, plan_layout
except ModuleNotFoundError as e:
    if e.name != "openfhe":
        raise

TEST_PRESET = "insecure_n4096"
TEST_ALLOWED = ("san48_55", TEST_PRESET)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def open_sessions(layout, input_bound=4.0):
    """A client session and the provider's view of it (in one process, as in the benchmark)."""
    client = ClientSession.create(layout, input_bound=input_bound)
    provider = ProviderSession.load(client.bundle(), allowed_presets=TEST_ALLOWED)
    return client, provider


@pytest.fixture
def head_setup(rng):
    """A 300 -> 5 head on the test ring, with its plan and one open session pair; closed after the test."""
    layout = plan_layout(300, 5, preset=TEST_PRESET)
    A, a = rng.normal(size=(300, 5)) / np.sqrt(300), rng.normal(size=5)
    plan = LinearPlan.build(layout, A, a)
    client, provider = open_sessions(layout)
    yield layout, A, a, plan, client, provider
    provider.close()
    client.close()
