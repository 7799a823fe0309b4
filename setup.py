"""linalign_jax: linear alignment between language models, with CKKS-encrypted cross-silo inference (HELIX)."""
from setuptools import find_packages, setup

setup(
    name="linalign_jax",
    version="0.1.0",
    description="Linear alignment between independently trained LMs in JAX, with HELIX privacy-preserving inference.",
    packages=find_packages(include=["linalign_jax", "linalign_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=[
        "jax>=0.6.2",
        "flax>=0.10.7",
        "optax>=0.2.8",
        "numpy>=1.26",
        "scipy>=1.11",
        "absl-py>=2.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "transformers>=4.57",  # tokenizers from GGUF metadata and hub configs only: no model code is used
        "gguf>=0.10",
        "datasets>=3.0",
        "matplotlib>=3.8",
        "jinja2>=3.1",  # chat templates (tokenizer_config.json / GGUF tokenizer.chat_template), as transformers renders them
        "grpcio>=1.60",
        # OpenFHE's PyPI wheels hold one CPython each; only the 22.04 (cp310) build imports on glibc < 2.38.
        "openfhe==1.6.1.0.22.4; python_version == '3.10'",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "bench": ["tenseal>=0.3.14; python_version < '3.12'"],
        "dev": ["pytest>=8", "tenseal>=0.3.14; python_version < '3.12'"],
    },
)
