"""Honest numbers: binomial confidence intervals of single evaluations, aggregation over
checkpoints of one architecture (e.g. one per seed), and intervals on differences.

Three different uncertainties, reported apart:
  - `wilson`: the sampling error of one evaluation on n images (how much the error of
    *this* network could move on another n images): a 95% Wilson score interval;
  - `across_checkpoints`: the spread between independently trained networks of the same
    spec (seeds): mean ± sample std over checkpoints, with the number of checkpoints;
  - `welch`: the difference of two architectures' means over their seeds, with a 95%
    Welch t interval (unequal variances, Welch-Satterthwaite degrees of freedom).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models import Spec, spec_from_dict

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
    parts = [spec_from_dict(spec).name]
    if not spec["plain"] and "shortcut" in spec:
        parts.append(f"shortcut {spec['shortcut']}")
    if spec.get("base_width"):
        parts.append(f"width {spec['base_width']}")
    if spec.get("family") == "imagenet" and spec.get("stride_on", "3x3") != "3x3":
        parts.append(f"stride on {spec['stride_on']}")
    return ", ".join(parts)


def depth_family(spec: dict[str, Any]) -> str:
    """What two nets must share to be compared by depth: their spec without the depth
    (the block type, plain or residual, pre-activation, shortcut, width, drops; the spec's
    DEPTH_FIELDS: a ConvNeXt's blocks per stage are its depth)."""
    net = spec_from_dict(spec)
    return json.dumps({k: v for k, v in net.to_dict().items() if k not in net.DEPTH_FIELDS}, sort_keys=True)


def pool_suffix(checkpoint: dict[str, Any]) -> str:
    """How a checkpoint was selected, where that keeps it from pooling with others of its
    architecture: ' (init)' untrained, ' [best-by-val]' a run's best-*.ckpt, '' its final weights."""
    if checkpoint.get("init"):
        return " (init)"
    return " [best-by-val]" if Path(checkpoint.get("path") or "").stem.startswith("best-") else ""


def samples(checkpoints: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """The report's checkpoint entries that pool as independent samples (seeds): {label: pool},
    the pool being the architecture and `pool_suffix`; and a line for each one left out.

    A pool whose runs were trained with different recipes (their config.yaml but for the
    seed, `runner.run_recipe`: e.g. two learning rates) is not pooled at all: its spread would
    not be the seeds'. Within a pool, a checkpoint that shares an identity (its `sample`: the
    run's seed, its run folder, the digest of its weights) with an earlier one is the same
    training run again, e.g. one command run twice with its default seed, or a copied file:
    the first one given stands for it. Pooled twice, one run would pass for two seeds with
    no spread."""
    by_pool: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in checkpoints:
        by_pool[arch_label(c["spec"]) + pool_suffix(c)].append(c)
    pools: dict[str, str] = {}
    notes = []
    for pool, cs in by_pool.items():
        differ = recipe_differences([c["recipe"] for c in cs if c.get("recipe")])
        if differ:
            notes.append(f"{pool}: not pooled: its checkpoints ({', '.join(c['label'] for c in cs)}) were trained "
                         f"with different recipes ({differ}); pass the runs of one recipe.")  # fmt: skip
            continue
        kept: list[tuple[str, set[str]]] = []
        for c in cs:
            ids = set(c.get("sample") or [c["label"]])
            first = next(((label, ids & seen) for label, seen in kept if ids & seen), None)
            if first:
                same = ", ".join(sorted(first[1], key=lambda x: not x.startswith("seed")))
                notes.append(f"{c['label']}: the same training run as {first[0]} ({same}); not pooled again.")
                continue
            kept.append((c["label"], ids))
            pools[c["label"]] = pool
    return pools, notes


def recipe_differences(recipes: list[dict[str, Any]], most: int = 4) -> str:
    """'optimizer.init_args.lr (0.01, 0.1)': the keys whose values differ between the recipes
    (at most `most`, then how many more); '' when they agree."""
    keys = sorted({k for r in recipes for k in r})
    differ = [(k, sorted({json.dumps(r.get(k), sort_keys=True) for r in recipes})) for k in keys]
    differ = [(k, v) for k, v in differ if len(v) > 1]
    text = "; ".join(f"{k} ({', '.join(v)})" for k, v in differ[:most])
    return text + (f"; {len(differ) - most} more" if len(differ) > most else "")


def across_checkpoints(
    rows: list[dict], pooled: Callable[[dict], list[tuple[str, float]]], pools: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Mean ± std of each pooled value over the checkpoints of one architecture.

    `pooled(row)` gives the (key, value) pairs a row pools under (its study decides: e.g.
    a dropped block's error, and again under "mean over blocks"). Values of one key are
    first averaged within each checkpoint (k-subsets: one number per checkpoint and k),
    then pooled. `pools` ({checkpoint label: pool}, from `samples`) names the checkpoints
    that are samples and what they pool as; without it, each row's own architecture.
    Only pools of at least two checkpoints are reported."""
    per: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if pools is not None and r["checkpoint"] not in pools:
            continue
        arch = pools[r["checkpoint"]] if pools is not None else r.get("arch", r["spec"])
        for key, value in pooled(r):
            per[(arch, r["condition"], r["study"], key)][r["checkpoint"]].append(value)
    out = []
    for (arch, cond, study, key), by_ck in per.items():
        values = [statistics.fmean(v) for v in by_ck.values()]
        if len(values) < 2:
            continue
        not_finite = sum(not math.isfinite(v) for v in values)  # e.g. a loss that overflowed
        out.append(
            {
                "arch": arch,
                "condition": cond,
                "study": study,
                "key": key,
                "n_checkpoints": len(values),
                "not_finite": not_finite,
                "mean": statistics.fmean(values),
                "std": math.nan if not_finite else statistics.stdev(values),
                "min": min(values),
                "max": max(values),
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


@dataclass(frozen=True)
class Difference:
    """mean(b) - mean(a), with its Welch t interval (None when a side has fewer than 2 values)."""

    mean: float
    lo: float | None
    hi: float | None
    n_a: int
    n_b: int
    df: float | None
    level: float = 0.95

    @property
    def resolved(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    def verdict(self, lower: str, higher: str) -> str:
        """`lower` if the whole interval is below 0, `higher` if above, else not resolved."""
        if not self.resolved:
            return f"not resolved at n = {self.n_b}/{self.n_a}"
        return lower if self.hi < 0 else higher

    def interval(self, fmt: str = "+.2f") -> str:
        if not math.isfinite(self.mean):
            return "- (a value is not finite)"
        if self.lo is None:
            return "- (needs n ≥ 2 per side)"
        return f"[{self.lo:{fmt}}, {self.hi:{fmt}}]"


def welch(a: list[float], b: list[float], level: float = 0.95) -> Difference:
    """mean(b) - mean(a) and its Welch t interval over independent runs (e.g. seeds).

    Each side's mean has variance s²/n; the difference's standard error is their sum's
    root, and its t quantile uses the Welch-Satterthwaite degrees of freedom. Sides with
    no spread at all (every run equal) give a zero-width interval. A value that is not finite
    (a loss that overflowed) makes the difference not finite and gives no interval."""
    from scipy.stats import t

    if not a or not b:
        raise ValueError("welch needs at least one value per side")
    d = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2 or not math.isfinite(d):
        return Difference(d, None, None, len(a), len(b), None, level)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = va + vb
    if se2 == 0:
        return Difference(d, d, d, len(a), len(b), None, level)
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(t.ppf(0.5 + level / 2, df)) * math.sqrt(se2)
    return Difference(d, d - half, d + half, len(a), len(b), df, level)


def mean_spread(mean: float, std: float | None, n: int, extra: str = "") -> str:
    """'mean ± std`extra`' over n values; one value has no sample spread, so it reads
    'mean (n = 1)' rather than a made-up ± 0.00."""
    if n < 2 or std is None:
        return f"{mean:.2f} (n = 1)"
    return f"{mean:.2f} ± {std:.2f}{extra}"


def net_differences(values: dict[str, float], checkpoints: list[dict[str, Any]]) -> list[tuple[str, Difference]]:
    """Per-checkpoint scalars (e.g. a top Hessian eigenvalue) compared across seeds, with Welch
    intervals: deep − shallow within a depth family (each depth against the shallowest), and
    plain − residual at the same depth (otherwise the same spec but for its PLAIN_FIELDS).
    `checkpoints` are the report's meta entries ({"label", "spec", "init"}); untrained (init:)
    nets compare only with untrained ones."""
    groups: dict[str, list[float]] = defaultdict(list)
    specs: dict[str, Spec] = {}
    pools, _ = samples(checkpoints)
    for c in checkpoints:
        if c["label"] in values and c["label"] in pools:
            spec = spec_from_dict(c["spec"])
            key = json.dumps({**spec.to_dict(), "selected": pool_suffix(c)}, sort_keys=True)
            groups[key].append(values[c["label"]])
            specs[key] = spec
    name = {k: s.name + json.loads(k)["selected"] for k, s in specs.items()}

    def without(key: str, *fields: str) -> str:
        return json.dumps({k: v for k, v in json.loads(key).items() if k not in fields}, sort_keys=True)

    out = []
    families: dict[str, list[str]] = defaultdict(list)
    for k in groups:
        families[without(k, *specs[k].DEPTH_FIELDS)].append(k)
    for ks in families.values():
        ks.sort(key=lambda k: specs[k].depth)
        out += [(f"{name[k]} − {name[ks[0]]}", welch(groups[ks[0]], groups[k])) for k in ks[1:]]
    twins: dict[str, dict[bool, str]] = defaultdict(dict)
    for k in groups:  # plain ResNets keep the default shortcut A; a plain ConvNeXt changes more (PLAIN_FIELDS)
        twins[without(k, *specs[k].PLAIN_FIELDS)][specs[k].plain] = k
    for pair in twins.values():
        if len(pair) == 2:
            out.append((f"{name[pair[True]]} − {name[pair[False]]}", welch(groups[pair[False]], groups[pair[True]])))
    return out


def differences_table(
    rows: list[tuple[str, list[tuple[str, Difference]]]], digits: int = 3
) -> tuple[list[str], list[list[str]]]:
    """One table of `net_differences` for several quantities: (quantity, its differences)."""
    body = []
    for what, diffs in rows:
        for comparison, d in diffs:
            ci = d.interval(f"+.{digits}g")
            body.append([what, comparison, f"{d.n_b}/{d.n_a}", f"{d.mean:+.{digits}g}", ci,
                         d.verdict("lower", "higher")])  # fmt: skip
    return ["quantity", "comparison (a − b)", "n (a/b)", "Δ mean", "95% Welch CI", "a is"], body
