"""Learning-rate schedules that count iterations, as He et al. do."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class PaperLR(LRScheduler):
    """Step decay at iteration milestones, with the paper's error-triggered warm-up.

    lr = base_lr * gamma ** (number of milestones <= iteration). Stepped every
    iteration (the CLI sets interval="step"), so milestones are iterations: the
    CIFAR recipe is milestones=[32000, 48000] with max_steps=64000 at batch 128.

    Warm-up (Sec. 4.2, ResNet-110): lr = warmup_lr until the training error drops
    below `warmup_until_error` (%), then the base lr. The trigger is the error,
    reported by the LightningModule through `observe_train_error`; it is smoothed
    (EMA, `warmup_ema`) so one lucky batch cannot end it. `warmup_max_steps` caps
    the warm-up. The state (on or off, the EMA) is part of `state_dict()`, so a
    resumed run continues in the same phase.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int] = (32000, 48000),
        gamma: float = 0.1,
        warmup_lr: float | None = None,
        warmup_until_error: float = 80.0,
        warmup_max_steps: int = 2000,
        warmup_ema: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        self.milestones = [int(m) for m in milestones]
        self.gamma = gamma
        self.warmup_lr = warmup_lr
        self.warmup_until_error = warmup_until_error
        self.warmup_max_steps = warmup_max_steps
        self.warmup_ema = warmup_ema
        self.warming_up = warmup_lr is not None
        self.warmup_ended_at: int | None = None
        self.error_ema: float | None = None
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.warming_up:
            return [float(self.warmup_lr)] * len(self.base_lrs)
        k = bisect_right(self.milestones, self.last_epoch)
        return [base * self.gamma**k for base in self.base_lrs]

    def observe_train_error(self, error_pct: float) -> None:
        """Feed one batch's training error (%); may end the warm-up."""
        if not self.warming_up:
            return
        e = self.error_ema
        self.error_ema = error_pct if e is None else self.warmup_ema * e + (1 - self.warmup_ema) * error_pct
        if self.error_ema < self.warmup_until_error or self.last_epoch >= self.warmup_max_steps:
            self.warming_up = False
            self.warmup_ended_at = self.last_epoch
            for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
                group["lr"] = lr
            self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
