"""`single`: remove each block alone at test time (Veit et al. 2016, Sec. 4.1 / Fig. 3).

Rows: the intact net, then each removable block dropped; with `bn_recalib`, the same
drops again with BN re-estimated on training images ('recalibrated-bn' rows).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import engine
from ..study import Section, Study, chance_error, check_fields, option, plot_along_depth, save_figure

NAME = "single"


@dataclass(frozen=True)
class Options:
    bn_recalib: int | None = option(
        None,
        "also report single-block removal with BN re-estimated on N training images",
        kind="count?",
        metavar="N",
    )

    def __post_init__(self) -> None:
        check_fields(self)


def by_net(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """{(checkpoint, condition): the rows of its dropped blocks} (the intact row apart)."""
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["study"] == NAME and r["key"] != "intact":
            out[(r["checkpoint"], r["condition"])].append(r)
    return out


def _err(r: dict | None) -> str:
    """Error with its 95% Wilson interval over the evaluated images."""
    if r is None:
        return "-"
    if "error_ci_lo" not in r:
        return f"{r['error']:.2f}"
    return f"{r['error']:.2f} [{r['error_ci_lo']:.1f}, {r['error_ci_hi']:.1f}]"


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows: baseline, then each block; one error column per checkpoint (eval-BN)."""
    nets = by_net(rows)
    cols = [ck for (ck, cond) in nets if cond == "eval-bn"]
    if not cols:
        return [], []
    per = {ck: {r["block"]: r for r in nets[(ck, "eval-bn")]} for ck in cols}
    names = [r["block"] for r in sorted(nets[(cols[0], "eval-bn")], key=lambda r: r["position"])]
    intact = {r["checkpoint"]: r for r in rows if r["study"] == NAME and r["key"] == "intact"}
    body = [["intact (baseline)", *[_err(intact.get(ck)) for ck in cols]]]
    for n in names:
        r0 = per[cols[0]][n]
        mark = " (downsample)" if r0["downsample"] else ""
        if r0.get("removed_as", "identity") != "identity":
            mark += f" → {r0['removed_as']}"
        body.append([f"drop {n}{mark}", *[_err(per[ck].get(n)) for ck in cols]])
    return ["condition", *cols], body


def removal_note(rows: list[dict], meta: dict[str, Any]) -> str:
    num_classes = meta["num_classes"]
    kept = sorted({r["removed_as"] for r in rows if r.get("removed_as") not in (None, "-", "identity")})
    preact = {c["spec"].get("preact", False) for c in meta["checkpoints"]}
    merge = {frozenset([False]): "relu(shortcut(x))", frozenset([True]): "shortcut(x)"}.get(
        frozenset(preact), "relu(shortcut(x)) (post-activation) or shortcut(x) (pre-activation)"
    )
    shortcut = "."
    if kept:
        shortcut = f"; where it is not, its shortcut is kept ({', '.join(kept)}), so that removal is not y = x."
    return (
        f"A removed block computes y = {merge}: y = x where its shortcut is the identity{shortcut}"
        f" Chance error: {chance_error(num_classes):.2f}% ({num_classes} classes)."
    )


def plot_single(ax, nets: dict[tuple[str, str], list[dict]], intact: dict[str, float], colour: dict, classes: int):
    for (ck, cond), rs in nets.items():
        rs = sorted(rs, key=lambda r: r["position"])
        (line,) = ax.plot(
            [r["position"] for r in rs],
            [r["error"] for r in rs],
            "o-" if cond == "eval-bn" else "s:",
            color=colour[ck],
            label=f"{ck} [{cond}]",
        )
        down = [r for r in rs if r["downsample"]]
        ax.scatter([r["position"] for r in down], [r["error"] for r in down], s=140, facecolors="none",
                   edgecolors=line.get_color(), linewidths=1.5)  # fmt: skip
        if ck in intact:
            ax.axhline(intact[ck], color=line.get_color(), ls="--", lw=1)
    ax.axhline(chance_error(classes), color="gray", ls=":", lw=1, label=f"chance ({classes} classes)")
    # Name the ticks only where every net's block at that position has the same name
    # (nets of different depths, or --blocks subsets, would otherwise be mislabelled).
    at: dict[int, set[str]] = defaultdict(set)
    for rs in nets.values():
        for r in rs:
            at[r["position"]].add(r["block"])
    if all(len(v) == 1 for v in at.values()):
        ax.set_xticks(sorted(at), [next(iter(at[p])) for p in sorted(at)], rotation=60, fontsize=7)
    else:
        ax.set_xlabel("position of the removed block (forward order; the nets differ in depth)")
    ax.set(ylabel="error (%)", title="Error with one block removed (dashed: intact; circled: downsampling)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


class Single(Study):
    name = NAME
    default = True
    Options = Options
    metrics = {
        "intact_error": "top-1 error (%) of the intact net",
        "mean_single_error": "mean error over the single-block removals",
        "max_single_error": "worst single-block removal",
    }

    def run(self, unit) -> None:
        conds = engine.single_block_conditions(unit.model, unit.blocks)
        unit.conditions(NAME, "all", conds)
        if unit.opts.bn_recalib:
            unit.conditions(NAME, "all", conds[1:], "recalibrated-bn", unit.opts.bn_recalib)

    def summary(self, rows: list[dict]) -> dict[str, float]:
        out, drops = {}, []
        for r in self.mine(rows):
            if r["key"] == "intact":
                out["lesion/intact_error"] = r["error"]
            else:
                drops.append(r["error"])
        if drops:
            out["lesion/mean_single_error"] = statistics.fmean(drops)
            out["lesion/max_single_error"] = max(drops)
        return out

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        keys = [row["key"]] + (["mean over blocks"] if row["key"] != "intact" else [])
        return [(k, row["error"]) for k in keys]

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        recalib = meta["options"].get("bn_recalib")
        bn = f" 'recalibrated-bn' rows re-estimate BN on {recalib} training images." if recalib else ""
        wilson = (
            "Brackets: 95% Wilson interval of each error over the evaluated images (the sampling error of one "
            "evaluation, not the spread between training runs)."
        )
        note = removal_note(rows, meta) + bn
        return [Section("Single-block removal (top-1 error, %)", [note], table(rows), [wilson])]

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        nets = by_net(rows)
        if not nets:
            return None
        import matplotlib.pyplot as plt

        intact = {r["checkpoint"]: r["error"] for r in self.mine(rows) if r["key"] == "intact"}
        fig, ax = plt.subplots(figsize=(9, 4))
        plot_single(ax, nets, intact, colour, num_classes)
        return save_figure(fig, out / "single_block.png")

    def plot_pooled(self, ax, agg: list[dict], colour: str, label: str) -> bool:
        single = [a for a in agg if a["key"].startswith("drop:")]
        return plot_along_depth(
            ax,
            single,
            colour,
            label,
            xlabel="position of the removed block (0 = first, 1 = last)",
            ylabel="error (%)",
            title="One block removed: mean ± std over checkpoints",
        )
