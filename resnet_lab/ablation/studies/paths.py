"""`paths`: which path lengths carry the gradient (Veit et al. 2016, Sec. 5 / Fig. 6).

Rows per residual checkpoint: one per path length k = 0..n (routed gradient norms,
stored in units of PATH_LENGTHS_PER_UNIT lengths, so a kill loses one unit), completed
with each length's share of the total gradient and an 'effective range' row. A plain
net has one path: one 'not applicable' row. The measurement is `ablation/paths.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from ..study import AblationError, Section, Study, option, save_figure

NAME = "paths"
PATH_LENGTHS_PER_UNIT = 8


@dataclass(frozen=True)
class Options:
    paths_images: int = option(
        256, "images of the split to measure routed gradients on (--samples routings per length)", metavar="N"
    )


def by_checkpoint(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """{checkpoint: {"lengths": [k rows], "range": row}} or {"na": reason} for plain nets."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["study"] != NAME:
            continue
        d = out.setdefault(r["checkpoint"], {"lengths": []})
        if not r.get("applicable"):
            d["na"] = r["reason"]
        elif r["key"] == "effective range":
            d["range"] = r
        else:
            d["lengths"].append(r)
    return out


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    by = by_checkpoint(rows)
    if not by:
        return [], []
    head = ["checkpoint", "blocks n", "measurements per length", "effective range (k)", "gradient share",
            "share of all paths"]  # fmt: skip
    body = []
    for ck, d in by.items():
        if "na" in d:
            body.append([ck, "-", "-", f"not applicable ({d['na']})", "-", "-"])
            continue
        r = d["range"]
        body.append(
            [
                ck,
                str(r["n_blocks"]),
                f"{r['grad_n']} ({r['grad_n'] // r['images']} routings x {r['images']} images)",
                f"{r['range_lo']}–{r['range_hi']}",
                f"{100 * r['range_gradient_share']:.1f}%",
                f"{100 * r['range_path_share']:.3g}%",
            ]
        )
    return head, body


class Paths(Study):
    name = NAME
    Options = Options
    metrics = {
        "paths_range_lo": "shortest path length of the effective range",
        "paths_range_hi": "longest path length of the effective range",
        "paths_path_share": "share of all paths inside the effective range",
    }

    def check(self, specs, options, common) -> None:
        if all(s.plain for s in specs):
            raise AblationError(
                "--studies paths needs a residual net: every checkpoint given is plain (one path, no skips); "
                "add a residual checkpoint or drop 'paths'"
            )

    def data_notes(self, options, common, n_split: int) -> list[str]:
        if options.paths_images <= n_split:
            return []
        return [
            f"--paths-images {options.paths_images} exceeds the {n_split} images of the {common.split} split; "
            f"the paths study measures on all {n_split} (the report says so)"
        ]

    def run(self, ctx) -> None:
        model, o, c = ctx.model, ctx.options, ctx.common
        if model.spec.plain:
            why = "plain net: no skip connections, one path through every block"
            ctx.whole(lambda: [ctx.row(key="not applicable", applicable=False, reason=why)])
            return
        n = len(model.block_names)
        data = None  # the same images for every unit, read once and only if a unit is left
        for lo in range(0, n + 1, PATH_LENGTHS_PER_UNIT):
            lengths = range(lo, min(n, lo + PATH_LENGTHS_PER_UNIT - 1) + 1)
            for rows in ctx.unit(f"k{lengths[0]}-{lengths[-1]}"):
                data = data or list(ctx.batches(c.split, o.paths_images))
                stats = paths.gradient_by_length(model, data, lengths, c.samples, c.seed, ctx.progress)
                images = sum(len(y) for _, y in data)
                rows += [ctx.row(applicable=True, **r) for r in paths.length_rows(model, stats, images)]

    def complete(self, rows: list[dict]) -> list[dict]:
        """Each checkpoint's length rows with (c) total_share and its effective-range row
        (derived from the stored measurements; idempotent); other rows unchanged."""
        out, by_ck = [], {}
        for r in rows:
            if r["study"] == NAME and r["key"] == "effective range":
                continue  # derived: recomputed below
            if r["study"] == NAME and r.get("applicable"):
                by_ck.setdefault(r["checkpoint"], []).append(r)
            else:
                out.append(r)
        for rs in by_ck.values():
            out += paths.with_shares(rs)
        order = {ck: i for i, ck in enumerate(dict.fromkeys(r["checkpoint"] for r in rows))}
        return sorted(out, key=lambda r: order[r["checkpoint"]])  # stable: each checkpoint's rows in stored order

    def summary(self, rows: list[dict]) -> dict[str, float]:
        out = {}
        for r in self.mine(rows):
            if r["key"] == "effective range":
                out["lesion/paths_range_lo"], out["lesion/paths_range_hi"] = r["range_lo"], r["range_hi"]
                out["lesion/paths_path_share"] = r["range_path_share"]
        return out

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        o = meta["options"]
        note = (
            "Veit et al. Sec. 5: the forward pass is intact; in the backward pass, k randomly sampled blocks pass "
            "the gradient through their residual branch and the rest through their skip. Per length k = 0..n, "
            f"{o['samples']} random routings on each of {min(meta['n_split'], o['paths_images'])} images "
            f"(seed {o['seed']}), mean ||dL/dh0|| at the input of the first block. Total gradient per length = "
            "fraction of paths x mean magnitude, normalised; the effective range is the shortest window of lengths "
            "holding at least 90% of it. Plain nets have one path and are not applicable."
        )
        return [Section("Path lengths and the gradient (Veit et al. Fig. 6)", [note], table(rows))]

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        """Veit et al. Fig. 6 (a) path-length distribution, (b) gradient magnitude per
        length, (c) total gradient per length with the effective range shaded."""
        by = {ck: d for ck, d in by_checkpoint(rows).items() if "na" not in d}
        if not by:
            return None
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ck, d in by.items():
            rs = sorted(d["lengths"], key=lambda r: r["k"])
            ks = [r["k"] for r in rs]
            axes[0].plot(ks, [r["path_fraction"] for r in rs], "-", color=colour[ck], label=ck)
            axes[1].semilogy(ks, [r["grad_mean"] for r in rs], "o-", ms=2, color=colour[ck], label=ck)
            axes[2].plot(ks, [r["total_share"] for r in rs], "-", color=colour[ck], label=ck)
            axes[2].axvspan(d["range"]["range_lo"], d["range"]["range_hi"], color=colour[ck], alpha=0.12)
        axes[0].set(xlabel="path length k", ylabel="fraction of paths", title="(a) distribution of path lengths")
        axes[1].set(xlabel="path length k", ylabel="mean ||dL/dh0|| (log)", title="(b) gradient magnitude per path")
        axes[2].set(xlabel="path length k", ylabel="share of total gradient",
                    title="(c) total gradient per length (shaded: 90% range)")  # fmt: skip
        for ax in axes:
            ax.legend(fontsize=7)
        return save_figure(fig, out / "paths.png")
