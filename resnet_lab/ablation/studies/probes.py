"""`probes`: linear probes after the stem and every block (Alain & Bengio 2016).

A multinomial logistic regression on the pooled output (`model.pool`: global average;
for a ViT the mean token) of the stem and of every block (the points `forward_blocks`
passes between blocks, all from one forward pass per image), fitted on `probe_images`
training images drawn from --seed and scored on the evaluation split. Features are
standardised with the training images' mean and std.
The L2 strength is chosen on a held-out fifth of those training images (never on the
evaluation split) from L2_GRID, then the probe is refitted on all of them.

Solver: full-batch L-BFGS in float64 (torch.optim.LBFGS, strong-Wolfe line search) on
the convex objective mean CE + l2/2 ||W||^2 (the bias unpenalised). On 5,000 CIFAR
training images of preact-20 it fits a probe in 0.4-1.4 s on one thread, as fast as
scikit-learn's lbfgs on the same features, with the same test errors (21.64 vs 21.64% after
the last block, 44.08 vs 44.10% mid-depth), so the package needs no scikit-learn; the tests
check the weights against scikit-learn's `LogisticRegression(C=1/(n*l2))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import engine
from ..stats import wilson
from ..study import AblationError, Section, Study, option, plot_along_depth, position_rows, save_figure

NAME = "probes"
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HELD_OUT = 0.2  # share of the probe's training images that choose its L2


@dataclass(frozen=True)
class Options:
    probe_images: int = option(5000, "probes: training images to fit each linear probe on (drawn from --seed)")


@torch.no_grad()
def pooled_features(model, batches) -> tuple[dict[str, Tensor], Tensor]:
    """{"stem" / block name: (N, C) pooled outputs (float64; `model.pool`: the global average,
    a ViT's mean token)}, labels (N,)."""
    feats: dict[str, list[Tensor]] = {}
    ys = []
    for x, y in batches:
        for name, h in engine.representations(model, x):
            feats.setdefault(name, []).append(model.pool(h).double())
        ys.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(ys)


@dataclass
class Probe:
    weight: Tensor  # (C, K), on standardised features
    bias: Tensor  # (K,)
    mean: Tensor  # (C,) feature standardisation
    std: Tensor

    def logits(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std) @ self.weight + self.bias


def fit_probe(x: Tensor, y: Tensor, classes: int, l2: float, max_iter: int = 500) -> Probe:
    """Multinomial logistic regression minimising mean CE + l2/2 ||W||^2 (bias unpenalised)."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-12)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(w.detach(), b.detach(), mean, std)


def choose_l2(x: Tensor, y: Tensor, classes: int, generator: torch.Generator) -> float:
    """The L2 strength of L2_GRID with the lowest error on a held-out fifth of (x, y)
    (ties: the stronger one)."""
    perm = torch.randperm(len(y), generator=generator, device="cpu").to(y.device)  # the same split on any device
    cut = max(1, int(len(y) * HELD_OUT))
    val, fit = perm[:cut], perm[cut:]
    errors = []
    for l2 in L2_GRID:
        p = fit_probe(x[fit], y[fit], classes, l2)
        errors.append((int((p.logits(x[val]).argmax(1) != y[val]).sum()), -l2))
    return -min(errors)[1]


PER_CLASS = 10  # fewest probe images a class (the held-out fifth: 2 a class)


class Probes(Study):
    name = NAME
    Options = Options
    metrics = {
        "probe_last_error": "test error (%) of the linear probe on the last block's output",
        "probe_min_error": "lowest probe error (%) over the stem and all blocks",
    }

    def check(self, specs, options, common) -> None:
        """The probe is fit on 4/5 of --probe-images and its L2 chosen on the held-out fifth:
        at least PER_CLASS images a class, so that fifth holds two of each class."""
        classes = max(s.num_classes for s in specs)
        if options.probe_images < PER_CLASS * classes:
            raise AblationError(
                f"probes needs at least {PER_CLASS * classes} training images ({PER_CLASS} per class for "
                f"{classes} classes: L2 is chosen on a held-out fifth); --probe-images {options.probe_images} is "
                "too few: raise it"
            )

    def run(self, ctx) -> None:
        ctx.whole(lambda: self.rows(ctx))

    def rows(self, ctx) -> list[dict]:
        model, o = ctx.model, ctx.options
        classes = model.spec.num_classes
        train, y_train = pooled_features(model, ctx.sample("train", o.probe_images))
        test, y_test = pooled_features(model, ctx.batches())
        if ctx.progress:
            ctx.progress(len(y_test))
        down = set(model.downsample_blocks)
        rows = []
        for position, (name, x) in enumerate(train.items(), start=-1):
            l2 = choose_l2(x, y_train, classes, torch.Generator().manual_seed(ctx.common.seed))
            probe = fit_probe(x, y_train, classes, l2)
            wrong = int((probe.logits(test[name]).argmax(1) != y_test).sum())
            train_wrong = int((probe.logits(x).argmax(1) != y_train).sum())
            lo, hi = wilson(wrong, len(y_test))
            rows.append(
                ctx.row(
                    key=name,
                    block=name,
                    position=position,
                    downsample=name in down,
                    channels=x.shape[1],
                    error=100.0 * wrong / len(y_test),
                    wrong=wrong,
                    n=len(y_test),
                    error_ci_lo=lo,
                    error_ci_hi=hi,
                    l2=l2,
                    train_images=len(y_train),
                    train_error=100.0 * train_wrong / len(y_train),
                )  # fmt: skip
            )
        return rows

    def summary(self, rows: list[dict]) -> dict[str, float]:
        mine = sorted(self.mine(rows), key=lambda r: r["position"])
        if not mine:
            return {}
        return {"lesion/probe_last_error": mine[-1]["error"], "lesion/probe_min_error": min(r["error"] for r in mine)}

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        return [(f"probe {row['block']}", row["error"])]

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        mine = self.mine(rows)
        if not mine:
            return []
        cks = list(dict.fromkeys(r["checkpoint"] for r in mine))

        def cell(r: dict) -> str:
            return f"{r['error']:.2f} [{r['error_ci_lo']:.1f}, {r['error_ci_hi']:.1f}] (l2 {r['l2']:g})"

        body = position_rows(mine, range(-1, max(r["position"] for r in mine) + 1), cell)
        r0 = mine[0]
        note = (
            "A multinomial logistic regression on the pooled output (global average; a ViT's mean token) "
            f"of the stem (position -1) and of each block, fitted on {r0['train_images']} training images drawn "
            "from the seed, its L2 "
            f"chosen from {', '.join(f'{v:g}' for v in L2_GRID)} on a held-out fifth of them; top-1 error (%) on "
            f"the {r0['n']} evaluation images with its 95% Wilson interval (Alain & Bengio 2016)."
        )
        head = ["position", "after", *[f"{ck}: probe error %" for ck in cks]]
        return [Section("Linear probes after every block", [note], (head, body))]

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        mine = self.mine(rows)
        if not mine:
            return None
        import matplotlib.pyplot as plt

        from ..study import chance_error

        fig, ax = plt.subplots(figsize=(8, 4))
        for ck in dict.fromkeys(r["checkpoint"] for r in mine):
            rs = sorted((r for r in mine if r["checkpoint"] == ck), key=lambda r: r["position"])
            n = max(1, rs[-1]["position"] + 1)
            x = [(r["position"] + 1) / n for r in rs]
            style = "s--" if rs[0]["plain"] in (True, "True") else "o-"
            ax.plot(x, [r["error"] for r in rs], style, ms=3, color=colour[ck], label=ck)
        ax.axhline(chance_error(num_classes), color="gray", ls=":", lw=1, label=f"chance ({num_classes} classes)")
        ax.set(xlabel="depth of the probed output (0 = stem, 1 = last block)", ylabel="probe error (%)",
               title="Linear probe error after each block (dashed: plain)")  # fmt: skip
        ax.legend(fontsize=7)
        return save_figure(fig, out / "probes.png")

    def plot_pooled(self, ax, agg: list[dict], colour: str, label: str) -> bool:
        return plot_along_depth(
            ax,
            agg,
            colour,
            label,
            xlabel="depth of the probed output (0 = stem, 1 = last block)",
            ylabel="probe error (%)",
            title="Linear probes: mean ± std over checkpoints",
        )
