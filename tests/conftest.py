"""Test-wide settings: one OpenMP thread (OpenFHE degrades badly on contended cores), float32 JAX on CPU."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
