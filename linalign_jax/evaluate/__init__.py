"""Evaluation of maps the way the paper does it: the target's linear head (heads), OOD scores and metrics (ood), and
the paper's settings — native, task-supervised map, public-only, public + ID k, few-shot k — over seeds (settings)."""
from linalign_jax.evaluate.heads import HeadConfig, LinearHead, accuracy, train_head
from linalign_jax.evaluate.ood import auroc, energy_score, fpr_at_tpr, msp_score, ood_metrics
from linalign_jax.evaluate.settings import SETTINGS, Paired, TaskFeatures, run_settings, sample_shots, setting_ids

__all__ = ["HeadConfig", "LinearHead", "accuracy", "train_head", "auroc", "energy_score", "fpr_at_tpr", "msp_score",
           "ood_metrics", "SETTINGS", "Paired", "TaskFeatures", "run_settings", "sample_shots", "setting_ids"]
