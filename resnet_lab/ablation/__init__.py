"""Test-time studies of trained checkpoints (lesions, Veit et al. 2016; representation analyses):
studies/ (the plug-ins), the prefix-shared engine, the resumable runner, reports."""

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
