"""The client refuses, before embedding anything, a public set or a map that does not match what it would embed
(issue 16: a wrong --data_seed gave λ 135 and 21% accuracy; a scale_out map without normalisation 19%)."""
import subprocess
import sys
import textwrap

import pytest

from tests.serve.conftest import REPO

pytest.importorskip("openfhe")

SCRIPT = """
    import sys
    from experiments import helix_client as hc
    from linalign_jax.errors import LinalignError
    hc.FLAGS(["helix_client", "--public_data=public", "--public_limit=512", "--data_seed=1",
              "--model=all-MiniLM-L6-v2", "--pooling=mean", "--normalize"])
    info = {"fit": {"public_set": "public[:512]@seed0", "n": 512},
            "provider": {"public_data": {"spec": "public", "limit": 512, "seed": 0}}}
    for call in (lambda: hc.check_public_set(info, None),
                 lambda: hc.check_public_set({"fit": {"public_set": "x", "n": 500}, "provider": {}}, 512),
                 lambda: hc.check_map({"source_model": "all-mpnet-base-v2", "pooling": "mean"}, "m1"),
                 lambda: hc.check_map({"source_model": "sentence-transformers/all-MiniLM-L6-v2", "pooling": "cls",
                                       "max_length": 64}, "m2")):
        try:
            call()
            print("accepted")
        except LinalignError as e:
            print(e)
    hc.check_map({"source_model": "sentence-transformers/all-MiniLM-L6-v2", "pooling": "mean", "normalize": True,
                  "max_length": 128}, "ok")
    print("matching map accepted")
"""


def test_client_refuses_mismatched_public_set_and_maps():
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 5, run.stderr[-2000:]
    assert "would embed another one: --data_seed=1 (provider: 0). Use the provider's values" in lines[0]
    assert "the client's public set has 512 rows, the provider's 'x' has 500" in lines[1]
    assert "maps from model 'all-mpnet-base-v2', this client embeds with --model=all-MiniLM-L6-v2" in lines[2]
    assert "fitted on unnormalised features, this client uses --normalize" in lines[2]  # no 'normalize' key
    assert "'cls' pooling" in lines[3] and "max_length 64" in lines[3] and "model" not in lines[3].split(":")[1][:20]
    assert lines[4] == "matching map accepted"
