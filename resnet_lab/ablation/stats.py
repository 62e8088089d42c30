"""Honest numbers for lesion results: binomial confidence intervals of single
evaluations, and aggregation over checkpoints of one architecture (e.g. one per seed).

Two different uncertainties, reported apart:
  - `wilson`: the sampling error of one evaluation on n images (how much the error of
    *this* network could move on another n images): a 95% Wilson score interval;
  - `across_checkpoints`: the spread between independently trained networks of the same
    spec (seeds): mean ± sample std over checkpoints, with the number of checkpoints.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..models import ResNetSpec

Z95 = 1.959963984540054


def wilson(wrong: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of an error rate `wrong / n`, in percent."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = wrong / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def arch_label(spec: dict[str, Any]) -> str:
    """What checkpoints must share to be pooled: the spec's name (depth, plain,
    pre-activation, block type, stochastic depth), shortcut option, width."""
    parts = [ResNetSpec.from_dict(spec).name]
    if not spec["plain"]:
        parts.append(f"shortcut {spec['shortcut']}")
    if spec.get("base_width"):
        parts.append(f"width {spec['base_width']}")
    if spec.get("family") == "imagenet" and spec.get("stride_on", "3x3") != "3x3":
        parts.append(f"stride on {spec['stride_on']}")
    return ", ".join(parts)


def across_checkpoints(rows: list[dict], pooled: Callable[[dict], list[tuple[str, float]]]) -> list[dict[str, Any]]:
    """Mean ± std of each pooled value over the checkpoints of one architecture.

    `pooled(row)` gives the (key, value) pairs a row pools under (its study decides: e.g.
    a dropped block's error, and again under "mean over blocks"). Values of one key are
    first averaged within each checkpoint (k-subsets: one number per checkpoint and k),
    then pooled. Only architectures with at least two checkpoints are reported."""
    per: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        arch = r.get("arch", r["spec"])
        for key, value in pooled(r):
            per[(arch, r["condition"], r["study"], key)][r["checkpoint"]].append(value)
    out = []
    for (arch, cond, study, key), by_ck in per.items():
        values = [statistics.fmean(v) for v in by_ck.values()]
        if len(values) < 2:
            continue
        out.append(
            {
                "arch": arch,
                "condition": cond,
                "study": study,
                "key": key,
                "n_checkpoints": len(values),
                "error_mean": statistics.fmean(values),
                "error_std": statistics.stdev(values),
                "error_min": min(values),
                "error_max": max(values),
            }
        )
    return out


@dataclass
class Running:
    """Running mean and sample std (float64) of values added a tensor at a time."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, values) -> None:
        v = values.double()
        self.n += v.numel()
        self.total += float(v.sum())
        self.total_sq += float((v * v).sum())

    @property
    def mean(self) -> float:
        return self.total / self.n

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0
        return math.sqrt(max(0.0, (self.total_sq - self.total**2 / self.n) / (self.n - 1)))


def mean_spread(mean: float, std: float | None, n: int, extra: str = "") -> str:
    """'mean ± std`extra`' over n values; one value has no sample spread, so it reads
    'mean (n = 1)' rather than a made-up ± 0.00."""
    if n < 2 or std is None:
        return f"{mean:.2f} (n = 1)"
    return f"{mean:.2f} ± {std:.2f}{extra}"
