"""Affine maps between two models' feature spaces: fitting (ridge, reduced-rank ridge, Procrustes, optax), token
pairing for generation maps, map quality metrics, and the map's on-disk form."""
from linalign_jax.align.fit import METHODS, MapConfig, fit_map
from linalign_jax.align.maps import AffineMap, apply_map, load_map, save_map
from linalign_jax.align.metrics import map_metrics
from linalign_jax.align.optax_map import OptaxMapConfig, fit_optax_map
from linalign_jax.align.pairing import gather_pairs, pair_token_offsets, pair_tokens
from linalign_jax.align.procrustes import fit_procrustes
from linalign_jax.align.ridge import (RidgeStats, accumulate_stats, batch_stats, fit_ridge, merge_stats,
                                      solve_reduced_rank, solve_ridge)

__all__ = ["METHODS", "MapConfig", "fit_map", "AffineMap", "apply_map", "load_map", "save_map", "map_metrics",
           "OptaxMapConfig", "fit_optax_map", "gather_pairs", "pair_token_offsets", "pair_tokens", "fit_procrustes",
           "RidgeStats", "accumulate_stats", "batch_stats", "fit_ridge", "merge_stats", "solve_reduced_rank",
           "solve_ridge"]
