"""`k`: remove k random blocks at once, k = 1..k_max (Veit et al. 2016, Sec. 4.2 / Fig. 5).

Rows: `samples` random k-subsets of the removable blocks per k (all of them where there
are fewer), drawn from (seed, k) alone; one unit per k.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import engine
from ..stats import mean_spread
from ..study import Section, Study, check_at_most_blocks, option, save_figure

NAME = "k"


@dataclass(frozen=True)
class Options:
    k_max: int = option(5, "k-block lesion: k = 1..K")


def curves(rows: list[dict]) -> dict[tuple[str, str], dict[int, tuple[float, float | None, int]]]:
    """{(checkpoint, condition): {k: (mean, std or None, n subsets)}}."""
    vals: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r["study"] == NAME:
            vals[(r["checkpoint"], r["condition"], r["k"])].append(r["error"])
    out: dict[tuple[str, str], dict[int, tuple]] = defaultdict(dict)
    for (ck, cond, k), errs in sorted(vals.items()):
        out[(ck, cond)][k] = (statistics.fmean(errs), statistics.stdev(errs) if len(errs) > 1 else None, len(errs))
    return out


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    c = curves(rows)
    if not c:
        return [], []
    ks = sorted({k for curve in c.values() for k in curve})
    head = ["k", *[f"{ck} [{cond}]" for ck, cond in c]]
    body = [[str(k), *[mean_spread(*c[t][k], f" (n = {c[t][k][2]})") if k in c[t] else "-" for t in c]] for k in ks]
    return head, body


class KLesion(Study):
    name = NAME
    default = True
    Options = Options
    metrics = {
        "kmax_error": "mean error over the subsets of the largest k run",
        "kN_error": "mean error over the subsets of k = N (k1_error, k2_error, ...)",
    }

    def check(self, specs, options, common) -> None:
        check_at_most_blocks("k_max", specs, options, common)

    def run(self, ctx) -> None:
        o, c = ctx.options, ctx.common
        for k in range(1, o.k_max + 1):
            ctx.lesions(f"k{k}", engine.k_conditions(ctx.model, k, c.samples, c.seed, ctx.blocks))

    def produces(self, metric: str) -> bool:
        return metric == "kmax_error" or re.fullmatch(r"k\d+_error", metric) is not None

    def summary(self, rows: list[dict]) -> dict[str, float]:
        mine, out = self.mine(rows), {}
        for k in sorted({r["k"] for r in mine}):  # ascending: kmax_error ends on the largest k
            out[f"lesion/k{k}_error"] = out["lesion/kmax_error"] = statistics.fmean(
                r["error"] for r in mine if r["k"] == k
            )
        return out

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        return [(f"k={row['k']}", row["error"])]

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        note = "Mean ± std over the k-subsets drawn (n each): all of them where --samples exceeds their number."
        return [Section("Random k-block removal (error %)", [note], table(rows))]

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        c = curves(rows)
        if not c:
            return None
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for (ck, cond), curve in c.items():
            ks = sorted(curve)
            m = [curve[k][0] for k in ks]
            sd = [curve[k][1] or 0.0 for k in ks]
            ax.plot(ks, m, "o-", color=colour[ck], label=f"{ck} [{cond}]")
            lo, hi = [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)]
            ax.fill_between(ks, lo, hi, alpha=0.2, color=colour[ck])
        ax.set(xlabel="blocks removed (k)", ylabel="error (%)", title="Random k-block lesions (mean ± std)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
        return save_figure(fig, out / "k_lesion.png")

    def plot_pooled(self, ax, agg: list[dict], colour: str, label: str) -> bool:
        ks = sorted(agg, key=lambda a: int(a["key"][2:]))
        if not ks:
            return False
        ax.errorbar([int(a["key"][2:]) for a in ks], [a["mean"] for a in ks], [a["std"] for a in ks],
                    fmt="o-", capsize=3, color=colour, label=label)  # fmt: skip
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel="blocks removed (k)", ylabel="error (%)", title="k random blocks: mean ± std over checkpoints")
        return True
