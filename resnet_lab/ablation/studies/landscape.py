"""`landscape`: the loss surface around the trained weights (Li et al. 2018, "Visualizing the
Loss Landscape of Neural Nets").

Directions. Each direction d is a Gaussian draw, one tensor per parameter, filter-normalised
as Li et al.: each filter d[i] (a conv's output channel, a linear layer's row) is rescaled to
the norm of the same filter of the weights, ||d[i]|| = ||theta[i]||. Biases and BN parameters
are zero (Li et al.'s `--xignore biasbn`) unless `--landscape-ignore none`, which sets them to
the weights themselves (the reference code's choice). The draw depends on `--seed`, the
direction's index and the parameter shapes in order, nothing else: nets of identical shapes
(plain-56 and resnet-56 with option A) get the same raw directions, so their comparison is
paired (the report says when it is).

Walks. Along each of `--landscape-directions` directions, G points over [-r, r] (plus +-r/2),
and a G x G grid over the plane of the first two. At each point theta + a d1 + b d2 the
checkpoint's training loss (ctx.loss) and top-1 error on the study's images (a seeded sample
of training images, no augmentation; or with --limit the evaluation split's first images).
BN uses the checkpoint's running statistics (`eval`, the reference behaviour), or statistics
re-estimated at that point on a second, separately seeded sample (`recalibrated`).

Summaries per checkpoint: the centre loss; the mean loss rise at r/2 and r over directions
and both signs (with its spread); the basin width, the distance from the centre at which the
loss first reaches twice the centre loss (linear between points; r where it never does, and
counted as censored); with a grid, its strict local minima (points whose loss is below each
of their grid neighbours': one for a convex bowl, more for Li et al.'s chaotic landscapes).
Pooled across checkpoints with Welch intervals on deep - shallow and plain - residual
differences.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import engine
from ..stats import differences_table, net_differences
from ..study import (
    AblationError,
    Measure,
    Section,
    Study,
    option,
    refuse_without_any_batchnorm,
    save_figure,
    without_batchnorm,
)

NAME = "landscape"
LOSS = Measure("training loss", 4)
DISTANCE = Measure("distance along a filter-normalised direction", 3)
MINIMA = Measure("strict local minima on the G x G grid", 1)
CHUNK = 500  # images per forward pass


@dataclass(frozen=True)
class Options:
    landscape_images: int = option(1000, "landscape: training images the loss is measured on (seeded sample)")
    landscape_directions: int = option(2, "landscape: random directions (1D walks; the grid spans the first two)")
    landscape_grid: int = option(11, "landscape: points per axis of the walks and of the G x G grid (odd, >= 3)")
    landscape_radius: float = option(1.0, "landscape: the walks span [-r, r] along each direction", "float>0")
    landscape_bn: str = option(
        "eval", "landscape: BN statistics at each point: the checkpoint's (eval) or re-estimated", "choice",
        ("eval", "recalibrated"),
    )  # fmt: skip
    landscape_bn_images: int = option(500, "landscape: training images BN is re-estimated on (a second sample)")
    landscape_ignore: str = option(
        "biasbn", "landscape: biasbn sets the directions of biases and BN parameters to 0; none includes them",
        "choice", ("biasbn", "none"),
    )  # fmt: skip


def shape_signature(params: dict[str, Tensor]) -> str:
    """What the raw directions depend on besides the seed: the parameter shapes in order."""
    return hashlib.sha1(repr([tuple(p.shape) for p in params.values()]).encode()).hexdigest()[:12]


def directions(params: dict[str, Tensor], count: int, seed: int, ignore: str = "biasbn") -> list[dict[str, Tensor]]:
    """`count` filter-normalised Gaussian directions (Li et al. 2018, Sec. 4)."""
    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        d = {}
        for name, w in params.items():
            raw = torch.randn(w.shape, generator=g, dtype=torch.float32, device="cpu").to(w.device)  # any device's
            if w.dim() <= 1:  # biases and BN weights/biases
                d[name] = torch.zeros_like(w) if ignore == "biasbn" else w.detach().clone()
                continue
            wf, rf = w.detach().reshape(len(w), -1), raw.reshape(len(w), -1)
            scale = wf.norm(dim=1) / rf.norm(dim=1).clamp_min(1e-12)
            d[name] = (rf * scale[:, None]).reshape(w.shape).to(w.dtype).contiguous(memory_format=_format(w))
        out.append(d)
    return out


def _format(w: Tensor) -> torch.memory_format:
    return torch.channels_last if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) else (
        torch.contiguous_format)  # fmt: skip


def set_point(model, theta: dict[str, Tensor], ds: list[Tensor | dict], coefs: list[float]) -> None:
    """Write theta + sum_k coefs[k] * ds[k] into the model's parameters (in place, no allocation)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(theta[name])
            for d, c in zip(ds, coefs):
                if c:
                    p.add_(d[name], alpha=c)


@torch.no_grad()
def loss_error(model, ctx_loss, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean loss and top-1 error (%) of the model (eval mode) on pre-made tensors. Far from the
    trained weights the activations can overflow: the loss is then not finite, and the error is
    NaN when any logit is (a class picked out of NaN logits is no prediction)."""
    total, wrong, undefined = 0.0, 0, False
    for i in range(0, len(y), CHUNK):
        logits = model(x[i : i + CHUNK])
        total += float(ctx_loss(logits.float(), y[i : i + CHUNK], reduction="sum"))
        wrong += int((logits.argmax(1) != y[i : i + CHUNK]).sum())
        undefined = undefined or bool(logits.isnan().any())
    return total / len(y), math.nan if undefined else 100.0 * wrong / len(y)


def walk_points(grid: int, radius: float) -> list[float]:
    """The G points of [-r, r] and +-r/2, ascending (0 is among them: G is odd)."""
    pts = torch.linspace(-radius, radius, grid, dtype=torch.float64, device="cpu").tolist()
    pts[grid // 2] = 0.0
    return sorted(set(pts) | {-radius / 2, radius / 2})


def basin_width(alphas: list[float], losses: list[float]) -> tuple[float, bool]:
    """Mean over the two signs of the distance at which the loss first reaches twice the centre
    loss (linear between points), and whether a side never did (censored at its last point, or
    at its last finite one where the loss stops being finite first: an overflow is not read as
    a doubling)."""
    centre = losses[alphas.index(0.0)]
    widths, censored = [], False
    for side in (1, -1):
        pts = sorted(((abs(a), v) for a, v in zip(alphas, losses) if a * side >= 0), key=lambda t: t[0])
        for (a0, l0), (a1, l1) in zip(pts, pts[1:]):
            if not math.isfinite(l1):
                widths.append(a0)
                censored = True
                break
            if l1 >= 2 * centre:
                widths.append(a0 + (a1 - a0) * (2 * centre - l0) / (l1 - l0) if l1 > l0 else a1)
                break
        else:
            widths.append(pts[-1][0])
            censored = True
    return statistics.fmean(widths), censored


def local_minima(points: dict[tuple[float, float], float]) -> int | None:
    """Strict local minima of a grid of losses {(a, b): loss}: the points whose loss is below
    that of each of their 4 neighbours on the grid (2 or 3 at its edges and corners); None for
    no grid, or one with points missing (rows of an unfinished run), whose count would mislead."""
    a, b = sorted({k[0] for k in points}), sorted({k[1] for k in points})
    if not points or len(points) != len(a) * len(b):
        return None
    count = 0
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            around = [(i + di, j + dj) for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))]
            around = [points[(a[u], b[v])] for u, v in around if 0 <= u < len(a) and 0 <= v < len(b)]
            count += all(points[(ai, bj)] < w for w in around)
    return count


class Landscape(Study):
    name = NAME
    Options = Options
    metrics = {
        "landscape_centre_loss": "training loss at the trained weights (the landscape's centre)",
        "landscape_rise_r": "mean loss rise at radius r over directions and signs",
        "landscape_basin_width": "mean distance at which the loss first doubles",
    }

    def check(self, specs, options, common) -> None:
        g = options.landscape_grid
        if g < 3 or g % 2 == 0:
            raise AblationError(f"--landscape-grid {g} must be odd and at least 3 (the centre is a point); e.g. 11")
        if options.landscape_bn == "recalibrated":
            refuse_without_any_batchnorm(specs, "--landscape-bn recalibrated", "ablation.landscape_bn")

    def run(self, ctx) -> None:
        o = ctx.options
        x = y = bn_batches = m = net = refold = theta = ds = what = None
        points = walk_points(o.landscape_grid, o.landscape_radius)
        axis = torch.linspace(-o.landscape_radius, o.landscape_radius, o.landscape_grid, device="cpu").tolist()
        axis[o.landscape_grid // 2] = 0.0
        todo = [(f"1d d{k + 1}", k, None, None) for k in range(o.landscape_directions)]
        if o.landscape_directions >= 2:
            todo += [(f"2d row{i}", 0, 1, b) for i, b in enumerate(axis)]
        for unit, k, k2, beta in todo:
            for rows in ctx.unit(unit, bn=o.landscape_bn):
                if m is None:  # set up once, and only if a unit is left
                    x, y, what = ctx.images(o.landscape_images)
                    if o.landscape_bn == "recalibrated":
                        bn_batches = list(ctx.sample("train", o.landscape_bn_images, ctx.common.seed + 1))
                    m, theta = ctx.scratch(), ctx.parameters()
                    net, refold = engine.fold_bn(m)  # evaluates m's function, its BNs folded
                    ds = directions(theta, o.landscape_directions, ctx.common.seed, o.landscape_ignore)
                alphas = points if k2 is None else axis
                for a in alphas:
                    coefs = [a] if k2 is None else [a, beta]
                    set_point(m, theta, [ds[k]] if k2 is None else [ds[k], ds[k2]], coefs)
                    if bn_batches is not None:
                        engine.recalibrate_bn(m, bn_batches, None)  # every weight moved: every BN
                    refold()
                    loss, err = loss_error(net, ctx.loss, x, y)
                    rows.append(ctx.row(
                        o.landscape_bn, key=f"{unit} a={a:+.4f}", walk="1d" if k2 is None else "2d",
                        direction=k + 1, alpha=a, beta=0.0 if k2 is None else beta, loss=loss, error=err,
                        images=len(y), sample=what, signature=shape_signature(theta),
                    ))  # fmt: skip
                if ctx.progress:
                    ctx.progress(len(y) * len(alphas))

    # -- summaries ---------------------------------------------------------------------
    def per_checkpoint(self, rows: list[dict]) -> dict[str, dict[str, Any]]:
        """{checkpoint: {centre, rise_half, rise_r (lists over directions and signs), widths, censored,
        minima (strict local minima of the grid; None without one)}}."""
        walks: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
        grids: dict[str, dict[tuple[float, float], float]] = defaultdict(dict)
        for r in self.mine(rows):
            if r.get("walk") == "1d":
                walks[r["checkpoint"]][r["direction"]].append(r)
            elif r.get("walk") == "2d":
                grids[r["checkpoint"]][(r["alpha"], r["beta"])] = r["loss"]
        out = {}
        for ck, by_dir in walks.items():
            s: dict[str, Any] = {"rise_half": [], "rise_r": [], "widths": [], "censored": 0}
            s["minima"] = local_minima(grids[ck])
            for rs in by_dir.values():
                rs = sorted(rs, key=lambda r: r["alpha"])
                alphas, losses = [r["alpha"] for r in rs], [r["loss"] for r in rs]
                r_max = max(alphas)
                centre = losses[alphas.index(0.0)]
                s["centre"] = centre
                for a, loss in zip(alphas, losses):  # relative: r/2 and r of r = 1e-12 are 5e-13 apart
                    if math.isclose(abs(a), r_max / 2, rel_tol=1e-9):
                        s["rise_half"].append(loss - centre)
                    elif math.isclose(abs(a), r_max, rel_tol=1e-9):
                        s["rise_r"].append(loss - centre)
                w, cens = basin_width(alphas, losses)
                s["widths"].append(w)
                s["censored"] += cens
            out[ck] = s
        return out

    def complete(self, rows: list[dict]) -> list[dict]:
        """Each checkpoint's summary rows (walk "summary": centre loss, rise at r/2 and r, basin
        width), recomputed from its 1D walks (idempotent); other rows unchanged."""
        out = [r for r in rows if not (r["study"] == NAME and r.get("walk") == "summary")]
        first = {}
        for r in self.mine(out):
            first.setdefault(r["checkpoint"], r)
        for ck, s in self.per_checkpoint(out).items():
            base = {k: first[ck][k] for k in ("checkpoint", "spec", "arch", "plain", "study", "condition")}
            for key, value in summaries(s).items():
                out.append({**base, "key": key, "walk": "summary", "value": value, "censored": s["censored"]})
        return out

    def summary(self, rows: list[dict]) -> dict[str, float]:
        names = {"centre loss": "centre_loss", "rise at r": "rise_r", "basin width": "basin_width"}
        return {f"lesion/landscape_{names[r['key']]}": r["value"] for r in self.mine(rows)
                if r.get("walk") == "summary" and r["key"] in names}  # fmt: skip

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        return [(row["key"], row["value"])] if row.get("walk") == "summary" else []

    def measure(self, key: str) -> Measure:
        return DISTANCE if key.startswith("basin") else MINIMA if key == "local minima" else LOSS

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        per = self.per_checkpoint(rows)
        if not per:
            return []
        mine = [r for r in self.mine(rows) if r.get("walk") != "summary"]
        first = mine[0]
        head = ["checkpoint", "centre loss", "rise at r/2 (mean ± std)", "rise at r (mean ± std)",
                "basin width (mean ± std)", "censored sides", "strict local minima (grid)"]  # fmt: skip
        body = []
        for ck, s in per.items():
            minima = "-" if s["minima"] is None else str(s["minima"])
            body.append([ck, f"{s['centre']:.4f}", _spread(s["rise_half"]), _spread(s["rise_r"]),
                         _spread(s["widths"]), str(s["censored"]), minima])  # fmt: skip
        sigs = {r["checkpoint"]: r["signature"] for r in mine}
        paired = [ck for ck in sigs if sum(v == sigs[ck] for v in sigs.values()) > 1]
        notes = [
            f"Loss ({bn_note(first['condition'], meta)}) on "
            f"{first['sample']}, along filter-normalised random directions (Li et al. 2018), seed "
            f"{meta['options']['seed']}. Rise: loss − centre loss at ±r/2 and ±r, over directions and both signs. "
            "Basin width: the distance at which the loss first doubles (censored: never within r, or the loss "
            "stopped being finite first). Strict local minima: grid points whose loss is below each of their 4 "
            "neighbours' (2-3 at the grid's edges).",
            "Paired directions (identical parameter shapes, the same random draw): "
            + (", ".join(paired) or "none")
            + ".",
        ]
        overflow = sum(not math.isfinite(r["loss"]) for r in mine)
        if overflow:
            notes.append(f"{overflow} of {len(mine)} points have a loss that is not finite: the activations "
                         "overflowed float32 that far from the weights (a smaller --landscape-radius avoids it); "
                         "their error is NaN where a logit is, and they are holes in the contours.")  # fmt: skip
        secs = [Section("Loss landscape (Li et al. 2018)", notes, (head, body), images=["landscape.png"])]
        summ = {ck: summaries(s) for ck, s in per.items()}
        diffs = [(q, net_differences({ck: v[q] for ck, v in summ.items() if q in v}, meta["checkpoints"]))
                 for q in ("centre loss", "rise at r", "basin width", "local minima")]  # fmt: skip
        table = differences_table(diffs)
        if table[1]:
            secs.append(Section("Loss landscape: differences across seeds (Welch 95%)", table=table))
        return secs

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        mine = [r for r in self.mine(rows) if r.get("walk") != "summary"]
        if not mine:
            return None
        import matplotlib.pyplot as plt

        cks = list(dict.fromkeys(r["checkpoint"] for r in mine))
        grids = {ck: [r for r in mine if r["checkpoint"] == ck and r["walk"] == "2d"] for ck in cks}
        with_grid = [ck for ck in cks if grids[ck]]
        cols = min(4, 1 + len(with_grid))  # rows of at most 4 panels: 12 nets stay readable
        nrows = math.ceil((1 + len(with_grid)) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
        axes = [ax for row in axes for ax in row]
        for ax in axes[1 + len(with_grid) :]:
            ax.set_visible(False)
        ax = axes[0]
        for ck in cks:
            rs = sorted((r for r in mine if r["checkpoint"] == ck and r["walk"] == "1d" and r["direction"] == 1),
                        key=lambda r: r["alpha"])  # fmt: skip
            ax.semilogy([r["alpha"] for r in rs], [r["loss"] for r in rs], "o-", ms=3, color=colour[ck], label=ck)
        ax.set(xlabel="step along direction 1", ylabel="training loss (log)", title="1D walk (Li et al. Fig. 2)")
        ax.legend(fontsize=7)
        for ax, ck in zip(axes[1:], with_grid):
            a = sorted({r["alpha"] for r in grids[ck]})
            b = sorted({r["beta"] for r in grids[ck]})
            z = torch.full((len(b), len(a)), float("nan"), dtype=torch.float64)
            for r in grids[ck]:  # a loss that is not finite stays a hole in the contours
                if math.isfinite(r["loss"]):
                    z[b.index(r["beta"]), a.index(r["alpha"])] = math.log10(max(r["loss"], 1e-12))
            ax.set(xlabel="direction 1", ylabel="direction 2")
            ax.set_title(f"{ck}\nlog10 loss (Li et al. Fig. 5)", fontsize=9)
            if z.isnan().all():  # overflowed at its own weights: no level to draw
                ax.text(0.5, 0.5, "no finite loss\nin this grid", ha="center", va="center", transform=ax.transAxes)
                continue
            # Li et al. draw levels over a fixed range above the minimum: here log10 loss, the
            # minimum to 1,000x it (a far corner at 1e5 would otherwise take every level).
            lo = float(z[~z.isnan()].min())
            levels = torch.linspace(lo, min(lo + 3, float(z[~z.isnan()].max())), 21).tolist()
            cs = ax.contour(a, b, z.numpy(), levels=sorted(set(levels)) if len(set(levels)) > 1 else 5,
                            cmap="viridis")  # fmt: skip
            ax.clabel(cs, fontsize=6, fmt="%.2f")
        return save_figure(fig, out / "landscape.png")


def bn_note(condition: str, meta: dict[str, Any]) -> str:
    lacking = without_batchnorm(meta["checkpoints"])
    note = f"{'re-estimated' if condition == 'recalibrated-bn' else 'checkpoint'} BN statistics"
    return note + (f"; {', '.join(lacking)}: no BatchNorm" if lacking else "")


def summaries(s: dict[str, Any]) -> dict[str, float]:
    out = {
        "centre loss": s["centre"],
        "rise at r/2": statistics.fmean(s["rise_half"]),
        "rise at r": statistics.fmean(s["rise_r"]),
        "basin width": statistics.fmean(s["widths"]),
    }
    if s.get("minima") is not None:
        out["local minima"] = float(s["minima"])
    return out


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if not all(map(math.isfinite, values)):
        return f"not finite at {sum(not math.isfinite(v) for v in values)} of {len(values)}"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f} (n = {len(values)})"
