"""`adjacent`: remove L adjacent blocks at once, every such run, L = 1..adjacent_max.

The ensemble view (Veit et al. 2016) reads a residual net as a collection of paths, each
an unordered subset of its blocks: removing any k of n blocks leaves the same 2^(n-k)
paths with the same distribution of lengths, whether the k are adjacent or scattered. So
it predicts that k adjacent blocks cost what k random blocks cost (the `k` study); a net
that computes in sequence, one stage's blocks building on each other, loses more when a
whole run of them goes. Rows: every run of L consecutive removable blocks (forward order),
so no random draws; where `k` ran on the same checkpoint, the report sets the two side by
side at equal counts.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine import Condition
from ..stats import mean_spread
from ..study import Section, Study, check_at_most_blocks, option, save_figure
from .k import curves as k_curves

NAME = "adjacent"


@dataclass(frozen=True)
class Options:
    adjacent_max: int = option(
        3, "adjacent-block lesion: every run of L = 1..L_MAX consecutive blocks", metavar="L_MAX"
    )


def runs(model, blocks: list[str], length: int) -> list[Condition]:
    """Every run of `length` consecutive blocks among `blocks`, in forward order."""
    names, down = model.block_names, set(model.downsample_blocks)
    order = sorted(blocks, key=names.index)
    out = []
    for i in range(len(order) - length + 1):
        run = tuple(order[i : i + length])
        meta = {
            "run_length": length,
            "first_block": run[0],
            "position": names.index(run[0]),
            "removed": "+".join(run),
            "downsample": any(b in down for b in run),
        }
        out.append(Condition(f"run{length}:{run[0]}", removed=run, meta=meta))
    return out


def by_length(rows: list[dict]) -> dict[tuple[str, str], dict[int, list[dict]]]:
    """{(checkpoint, condition): {L: its rows in forward order}}."""
    out: dict[tuple[str, str], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["study"] == NAME:
            out[(r["checkpoint"], r["condition"])][r["run_length"]].append(r)
    for per in out.values():
        for rs in per.values():
            rs.sort(key=lambda r: r["position"])
    return out


def comparison(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Per checkpoint and L: the runs' error, the worst run, and k random blocks at k = L."""
    ours, random = by_length(rows), k_curves(rows)
    if not ours:
        return [], []
    head = [
        "checkpoint",
        "L",
        "runs",
        "L adjacent removed",
        "worst run",
        "L random removed (k study)",
        "adjacent − random",
    ]
    body = []
    for (ck, cond), per in ours.items():
        for length, rs in sorted(per.items()):
            errs = [r["error"] for r in rs]
            m, sd = statistics.fmean(errs), statistics.stdev(errs) if len(errs) > 1 else None
            worst = max(rs, key=lambda r: r["error"])
            rnd = random.get((ck, cond), {}).get(length)
            body.append(
                [
                    f"{ck} [{cond}]",
                    str(length),
                    str(len(rs)),
                    mean_spread(m, sd, len(rs)),
                    f"{worst['error']:.2f} ({worst['removed']})",
                    mean_spread(*rnd) + f" (n = {rnd[2]})" if rnd else "-",
                    f"{m - rnd[0]:+.2f}" if rnd else "-",
                ]
            )
    return head, body


NOTE = (
    "Every run of L consecutive removable blocks (forward order) removed at once, eval-BN; mean ± std over the "
    "runs of one net (all of them: no random draws). The ensemble view predicts that L adjacent blocks cost what L "
    "random blocks cost (the k study's subsets, when it ran: the last columns); a run that holds a downsampling "
    "block is marked in results.csv (downsample)."
)


class Adjacent(Study):
    name = NAME
    Options = Options
    metrics = {"adjacentN_error": "mean error over the runs of N adjacent blocks removed (adjacent1_error, ...)"}

    def check(self, specs, options, common) -> None:
        check_at_most_blocks("adjacent_max", specs, options, common)

    def run(self, ctx) -> None:
        for length in range(1, ctx.options.adjacent_max + 1):
            ctx.lesions(f"L{length}", runs(ctx.model, ctx.blocks, length))

    def produces(self, metric: str) -> bool:
        return re.fullmatch(r"adjacent\d+_error", metric) is not None

    def summary(self, rows: list[dict]) -> dict[str, float]:
        mine = self.mine(rows)
        return {
            f"lesion/adjacent{n}_error": statistics.fmean(r["error"] for r in mine if r["run_length"] == n)
            for n in sorted({r["run_length"] for r in mine})
        }

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        return [(f"L={row['run_length']}", row["error"])]

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        return [Section("Adjacent blocks removed, against random blocks (error %)", [NOTE], comparison(rows))]

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        nets = by_length(rows)
        if not nets:
            return None
        import matplotlib.pyplot as plt

        lengths = sorted({n for per in nets.values() for n in per})
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False, sharey=True)
        for ax, n in zip(axes[0], lengths):
            for (ck, cond), per in nets.items():
                rs = per.get(n, [])
                ax.plot([r["position"] for r in rs], [r["error"] for r in rs], "o-", ms=3, color=colour[ck],
                        label=f"{ck} [{cond}]")  # fmt: skip
            ax.set(xlabel="position of the run's first block", title=f"{n} adjacent block(s) removed")
        axes[0][0].set_ylabel("error (%)")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return save_figure(fig, out / "adjacent.png")

    def plot_pooled(self, ax, agg: list[dict], colour: str, label: str) -> bool:
        ls = sorted(agg, key=lambda a: int(a["key"][2:]))
        if not ls:
            return False
        ax.errorbar([int(a["key"][2:]) for a in ls], [a["mean"] for a in ls], [a["std"] for a in ls],
                    fmt="o-", capsize=3, color=colour, label=label)  # fmt: skip
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(
            xlabel="adjacent blocks removed (L)",
            ylabel="error (%)",
            title="L adjacent blocks: mean ± std over checkpoints",
        )
        return True
