"""`shattered`: do input gradients decorrelate along a line in input space? (Balduzzi et al.
2017, "The Shattered Gradients Problem": white noise in deep plain nets, far less so with
skip connections.)

Lines, seeded by --seed, over the study's images (a seeded sample of training images, or with
--limit the evaluation split's first ones), `--shattered-lines` of each kind:
  - "pair": from image a to image b, P points x(t) = a + t (b - a), t in [0, 1];
  - "noise": around image a along a Gaussian direction u scaled to ||b - a||, x(t) = a + t u,
    t in [-1/2, 1/2] (the same length as its pair line, off the data).
At each of the P points (`--shattered-points`), the gradient with respect to the input of
the checkpoint's loss at the label of a (`--shattered-target loss`, default), or of a's
true-class logit (`logit`), BN in eval mode.

Correlation at lag l: the Pearson correlation of the gradients at points i and i + l (each
gradient centred over its input dimensions), averaged over i and then over the lines of one
kind. Summaries: the correlation at lag 1, and the correlation length, the first lag at which
it falls below 0.5, as a fraction of the line (1 and "censored" where it never does).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..stats import differences_table, net_differences
from ..study import AblationError, Measure, Section, Study, option, save_figure

NAME = "shattered"
CORRELATION = Measure("gradient correlation", 3)
LENGTH = Measure("correlation length (fraction of the line)", 3)
KINDS = ("pair", "noise")
THRESHOLD = 0.5


@dataclass(frozen=True)
class Options:
    shattered_lines: int = option(8, "shattered: lines of each kind (between two images; around one, off the data)")
    shattered_points: int = option(64, "shattered: points per line (at least 3)")
    shattered_target: str = option(
        "loss", "shattered: differentiate the checkpoint's loss or the true-class logit", "choice", ("loss", "logit")
    )


def lag_correlation(grads: Tensor) -> Tensor:
    """(P, D) gradients along a line -> (P,) mean Pearson correlation at lags 0 .. P-1."""
    g = grads.double().flatten(1)
    g = g - g.mean(1, keepdim=True)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    c = g @ g.T
    return torch.stack([torch.diagonal(c, lag).mean() for lag in range(len(g))])


def correlation_length(corr: Tensor) -> tuple[float, bool]:
    """First lag with correlation below THRESHOLD, as a fraction of the line; (1.0, True) if none."""
    below = (corr < THRESHOLD).nonzero()
    if len(below) == 0:
        return 1.0, True
    return int(below[0]) / (len(corr) - 1), False


def input_gradients(model, loss, x: Tensor, y: int, target: str) -> Tensor:
    """(P, ...) points -> (P, ...) gradients of each point's loss (or true-class logit) w.r.t. it."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_()
        logits = model(x)
        labels = torch.full((len(x),), y, dtype=torch.long, device=x.device)
        value = loss(logits, labels, reduction="sum") if target == "loss" else logits[:, y].sum()
        (g,) = torch.autograd.grad(value, x)
    return g


def lines(x: Tensor, y: Tensor, count: int, points: int, seed: int, kind: str) -> list[tuple[Tensor, int]]:
    """`count` lines of `kind` over consecutive image pairs: ((P, C, H, W) points, label of the start).
    Steps and directions are drawn on the CPU: the same lines on any device."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.linspace(0, 1, points, device="cpu") if kind == "pair" else
         torch.linspace(-0.5, 0.5, points, device="cpu")).to(x.device)  # fmt: skip
    out = []
    for i in range(count):
        a, b = x[2 * i], x[2 * i + 1]
        if kind == "pair":
            step = b - a
        else:
            u = torch.randn(a.shape, generator=g, device="cpu").to(x.device)
            step = u * (b - a).norm() / u.norm()
        out.append((a[None] + t.view(-1, 1, 1, 1) * step[None], int(y[2 * i])))
    return out


class Shattered(Study):
    name = NAME
    Options = Options
    metrics = {
        "shattered_lag1": "gradient correlation at lag 1 along lines between images",
        "shattered_length": "correlation length (fraction of the line) between images",
    }

    def check(self, specs, options, common) -> None:
        if options.shattered_points < 3:
            raise AblationError(f"--shattered-points {options.shattered_points}: a line needs at least 3 points")
        need = 2 * options.shattered_lines
        if common.limit is not None and common.limit < need:
            raise AblationError(f"--shattered-lines {options.shattered_lines} needs {need} images (two a line); "
                                f"--limit {common.limit} is too few: raise it")  # fmt: skip

    def run(self, ctx) -> None:
        o = ctx.options
        data: dict[str, Any] = {}
        for kind in KINDS:
            for rows in ctx.unit(kind):
                if not data:
                    x, y, what = ctx.images(2 * o.shattered_lines)
                    data.update(x=x, y=y, what=what, model=ctx.scratch())
                seed = ctx.common.seed + KINDS.index(kind)
                corr = torch.stack([
                    lag_correlation(input_gradients(data["model"], ctx.loss, pts, label, o.shattered_target))
                    for pts, label in lines(data["x"], data["y"], o.shattered_lines, o.shattered_points, seed, kind)
                ]).mean(0)  # fmt: skip
                length, censored = correlation_length(corr)
                common = dict(kind=kind, target=o.shattered_target, lines=o.shattered_lines, images=len(data["y"]),
                              sample=data["what"], depth=ctx.spec.depth, init=ctx.ckpt.init)  # fmt: skip
                rows += [ctx.row(key=f"{kind} lag{lag}", lag=lag, distance=lag / (len(corr) - 1), corr=float(c),
                                 **common) for lag, c in enumerate(corr)]  # fmt: skip
                rows.append(ctx.row(key=f"{kind} lag-1 correlation", lag=None, value=float(corr[1]), **common))
                rows.append(ctx.row(key=f"{kind} correlation length", lag=None, value=length, censored=censored,
                                    **common))  # fmt: skip
                if ctx.progress:
                    ctx.progress(o.shattered_lines * o.shattered_points)

    def summary(self, rows: list[dict]) -> dict[str, float]:
        names = {"pair lag-1 correlation": "shattered_lag1", "pair correlation length": "shattered_length"}
        return {f"lesion/{names[r['key']]}": r["value"] for r in self.mine(rows) if r["key"] in names}

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        return [(row["key"], row["value"])] if row["lag"] is None else []  # the summaries, not every lag

    def measure(self, key: str) -> Measure:
        return LENGTH if key.endswith("length") else CORRELATION

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        mine = self.mine(rows)
        summ = [r for r in mine if r["lag"] is None]
        if not summ:
            return []
        body = {}
        for r in summ:
            cells = body.setdefault((r["checkpoint"], r["kind"]), [r["checkpoint"], r["kind"], "-", "-"])
            if r["key"].endswith("correlation"):
                cells[2] = f"{r['value']:.3f}"
            else:
                cells[3] = f"{r['value']:.3f}" + (" (censored: never below 0.5)" if r["censored"] else "")
        first = summ[0]
        note = (f"Gradients of the {'loss' if first['target'] == 'loss' else 'true-class logit'} with respect to the "
                f"input along {first['lines']} lines of each kind over {first['sample']}: 'pair' from one image to "
                "another, 'noise' around an image along a random direction of the same length. Correlation: Pearson, "
                "between points `lag` apart, averaged over points and lines (Balduzzi et al. 2017).")  # fmt: skip
        head = ["checkpoint", "line", "correlation at lag 1", "correlation length (fraction of the line)"]
        secs = [Section("Shattered gradients", [note], (head, list(body.values())), images=["shattered.png"])]
        diffs = []
        for key in ("pair lag-1 correlation", "pair correlation length", "noise lag-1 correlation"):
            vals = {r["checkpoint"]: r["value"] for r in summ if r["key"] == key}
            diffs.append((key, net_differences(vals, meta["checkpoints"])))
        table = differences_table(diffs)
        if table[1]:
            secs.append(Section("Shattered gradients: differences across seeds (Welch 95%)", table=table))
        return secs

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        mine = [r for r in self.mine(rows) if r["lag"] is not None]
        if not mine:
            return None
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for ax, kind in zip(axes, KINDS):
            for ck in dict.fromkeys(r["checkpoint"] for r in mine):
                rs = sorted((r for r in mine if r["checkpoint"] == ck and r["kind"] == kind and r["lag"] > 0),
                            key=lambda r: r["lag"])  # fmt: skip
                ax.semilogx([r["distance"] for r in rs], [r["corr"] for r in rs], "-", color=colour[ck], label=ck)
            ax.axhline(THRESHOLD, color="gray", ls=":", lw=1)
            ax.set(xlabel="distance between points (fraction of the line, log)", ylabel="gradient correlation",
                   title=f"{kind} lines")  # fmt: skip
            ax.legend(fontsize=6, ncol=2)
        self._plot_depth(axes[2], [r for r in self.mine(rows) if r["key"] == "pair lag-1 correlation"])
        return save_figure(fig, out / "shattered.png")

    @staticmethod
    def _plot_depth(ax, summ: list[dict]) -> None:
        """Lag-1 correlation of pair lines against depth, mean ± std over checkpoints, per family."""
        groups: dict[str, dict[int, list[float]]] = {}
        for r in summ:
            name = ("plain" if r["plain"] else "residual") + (" (init)" if r.get("init") else " (trained)")
            groups.setdefault(name, {}).setdefault(r["depth"], []).append(r["value"])
        for i, (name, by_depth) in enumerate(sorted(groups.items())):
            ds = sorted(by_depth)
            mean = [sum(by_depth[d]) / len(by_depth[d]) for d in ds]
            sd = [statistics.stdev(by_depth[d]) if len(by_depth[d]) > 1 else 0.0 for d in ds]
            n = max(len(v) for v in by_depth.values())
            ax.errorbar(ds, mean, sd, fmt="o-" if "init" in name else "s--", capsize=3, color=f"C{i}",
                        label=f"{name}, n ≤ {n}")  # fmt: skip
        ax.set(xlabel="depth", ylabel="correlation at lag 1 (pair lines)", title="Gradient correlation vs depth")
        ax.legend(fontsize=7)
