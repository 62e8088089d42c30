"""Test-time lesion studies (Veit et al. 2016): engine, resumable runner, reports."""

from .engine import Condition, condition_logits, evaluate, k_subsets, kendall_tau
from .runner import AblationError, load_checkpoint

__all__ = [
    "AblationError",
    "Condition",
    "condition_logits",
    "evaluate",
    "k_subsets",
    "kendall_tau",
    "load_checkpoint",
]
