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

from ...models import spec_from_dict
from .. import engine
from ..stats import depth_family, pool_suffix, samples, welch
from ..study import (
    Section,
    Study,
    chance_error,
    option,
    plot_along_depth,
    refuse_without_any_batchnorm,
    save_figure,
    without_batchnorm,
)

NAME = "single"


@dataclass(frozen=True)
class Options:
    bn_recalib: int | None = option(
        None,
        "also report single-block removal with BN re-estimated on N training images",
        kind="count?",
        metavar="N",
    )


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
    # Every checkpoint's blocks, each in its forward order (nets of other depths or families differ).
    names = list(
        dict.fromkeys(r["block"] for ck in cols for r in sorted(per[ck].values(), key=lambda r: r["position"]))
    )
    intact = {r["checkpoint"]: r for r in rows if r["study"] == NAME and r["key"] == "intact"}
    body = [["intact (baseline)", *[_err(intact.get(ck)) for ck in cols]]]
    for n in names:
        r0 = next(per[ck][n] for ck in cols if n in per[ck])
        mark = " (downsample)" if r0["downsample"] else ""
        if r0.get("removed_as", "identity") != "identity":
            mark += f" → {r0['removed_as']}"
        body.append([f"drop {n}{mark}", *[_err(per[ck].get(n)) for ck in cols]])
    return ["condition", *cols], body


NEAR_CHANCE = 5.0  # points of error: a net this close to chance after a removal has nothing left to lose


def robustness(rows: list[dict], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Per architecture family, each depth against the shallowest, across checkpoints (e.g.
    seeds) with Welch intervals: the mean error increase of a single-block removal over the
    intact net (eval-BN), and the share of the intact net's margin below chance that it
    loses. Only the share compares nets that start at different errors: a net at 60% can
    lose 30 points before chance, one at 25% 65."""
    intact = {r["checkpoint"]: r["error"] for r in rows if r["study"] == NAME and r["key"] == "intact"
              and r["condition"] == "eval-bn"}  # fmt: skip
    if len(intact) < 2:  # one network: nothing to compare
        return []
    chance = chance_error(meta["num_classes"])
    entry = {c["label"]: c for c in meta["checkpoints"]}
    pools, _ = samples(meta["checkpoints"])  # one checkpoint per training run; init, best and last apart
    groups: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    names: dict[tuple[str, int], str] = {}
    for (ck, cond), drops in by_net(rows).items():
        if cond != "eval-bn" or ck not in intact or ck not in pools:
            continue
        net, selected = spec_from_dict(entry[ck]["spec"]), pool_suffix(entry[ck])
        fam, depth = depth_family(entry[ck]["spec"]) + selected, net.depth
        groups[fam][depth].append((intact[ck], statistics.fmean(r["error"] for r in drops)))
        names[(fam, depth)] = net.name + selected

    def increases(side):
        return [after - before for before, after in side]

    def mean(side, i):  # i = 0: intact error, 1: error with one block removed
        return statistics.fmean(x[i] for x in side)

    def shares(side):  # % of the margin below chance lost; a net at chance has none to lose
        return [100 * (after - before) / (chance - before) for before, after in side if before < chance]

    out = []
    for fam, by_depth in groups.items():
        depths = sorted(by_depth)
        shallow = by_depth[depths[0]]
        for d in depths[1:]:
            deep = by_depth[d]
            out.append(
                {
                    "comparison": f"{names[(fam, d)]} − {names[(fam, depths[0])]}",
                    "intact": (mean(deep, 0), mean(shallow, 0)),
                    "after": (mean(deep, 1), mean(shallow, 1)),
                    "increase": welch(increases(shallow), increases(deep)),
                    "shares": (shares(deep), shares(shallow)),
                    "near_chance": min(mean(deep, 1), mean(shallow, 1)) >= chance - NEAR_CHANCE,
                }
            )
    return out


def robustness_table(comps: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["comparison", "n (deep/shallow)", "intact, deep / shallow", "one removed, deep / shallow",
            "increase Δ [95% CI]", "margin lost, deep / shallow", "margin lost Δ [95% CI]", "verdict"]  # fmt: skip
    body = []
    for c in comps:
        inc, (deep, shallow) = c["increase"], c["shares"]
        share = welch(shallow, deep) if deep and shallow else None
        if c["near_chance"]:
            verdict = f"both within {NEAR_CHANCE:g} points of chance after one removal: neither is robust"
        elif share is None:
            verdict = "a side is at chance intact: no margin to lose"
        else:
            verdict = share.verdict("deeper is more robust", "deeper is less robust")
        body.append(
            [
                c["comparison"],
                f"{inc.n_b}/{inc.n_a}",
                " / ".join(f"{x:.2f}" for x in c["intact"]),
                " / ".join(f"{x:.2f}" for x in c["after"]),
                f"{inc.mean:+.2f} {inc.interval()}",
                f"{statistics.fmean(deep):.1f}% / {statistics.fmean(shallow):.1f}%" if share else "-",
                f"{share.mean:+.2f} {share.interval()}" if share else "-",
                verdict,
            ]
        )
    return head, body


ROBUSTNESS_NOTE = (
    "Per checkpoint, the mean error of a single-block removal (eval-BN) against its intact net: the increase in "
    "points of error, and the share of the intact net's margin below chance that the removal loses, (removed − "
    "intact) / (chance − intact). Then deeper minus shallowest within each architecture (the same spec but for "
    "depth), with a 95% Welch t interval across the checkpoints (e.g. seeds) of each side. The verdict is judged "
    "on the share, since nets that start at different errors have different room to lose (a raw increase "
    f"favours the worse net), and only where its interval excludes 0; where both sides end within {NEAR_CHANCE:g} "
    "points of chance after one removal, neither is robust and none is more robust."
)


def _removed_as(spec: dict) -> str:
    if spec.get("family", "cifar") not in ("cifar", "imagenet"):
        return "x (ViT and ConvNeXt units)"
    return (
        "shortcut(x) (pre-activation ResNets)" if spec.get("preact") else "relu(shortcut(x)) (post-activation ResNets)"
    )


def removal_note(rows: list[dict], meta: dict[str, Any]) -> str:
    num_classes = meta["num_classes"]
    kept = sorted({r["removed_as"] for r in rows if r.get("removed_as") not in (None, "-", "identity")})
    used = sorted({_removed_as(c["spec"]) for c in meta["checkpoints"]})
    merge = " or ".join(used) if len(used) > 1 else used[0].split(" (")[0]
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

    def check(self, specs, options, common) -> None:
        if options.bn_recalib:
            refuse_without_any_batchnorm(specs, f"--bn-recalib {options.bn_recalib}", "ablation.bn_recalib")

    def run(self, ctx) -> None:
        conds = engine.single_block_conditions(ctx.model, ctx.blocks)
        ctx.lesions("all", conds)
        if ctx.options.bn_recalib and ctx.spec.BATCHNORM:  # a net without BN has nothing to re-estimate
            ctx.lesions("all", conds[1:], bn="recalibrated", bn_images=ctx.options.bn_recalib)

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
        lacking = without_batchnorm(meta["checkpoints"])
        skipped = f" (not for {', '.join(lacking)}: no BatchNorm)" if lacking else ""
        bn = f" 'recalibrated-bn' rows re-estimate BN on {recalib} training images{skipped}." if recalib else ""
        wilson = (
            "Brackets: 95% Wilson interval of each error over the evaluated images (the sampling error of one "
            "evaluation, not the spread between training runs)."
        )
        note = removal_note(rows, meta) + bn
        out = [Section("Single-block removal (top-1 error, %)", [note], table(rows), [wilson])]
        comps = robustness(rows, meta)
        if comps:
            blocks = [" Only the --blocks given are removed."] if meta["options"].get("blocks") else []
            out.append(
                Section(
                    "Robustness to single-block removal, deeper vs shallower",
                    [ROBUSTNESS_NOTE + "".join(blocks)],
                    robustness_table(comps),
                )
            )
        return out

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
