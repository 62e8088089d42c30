"""`iterative`: residual blocks as iterative refinement (Jastrzebski et al. 2018; Greff et al. 2017).

For every block i, per evaluation image, with h_i the block input, f_i its step and g_i
the gradient of the image's loss:

    cos_i   = cos(f_i, g_i)         negative: the step goes down the loss (Jastrzebski et al.'s sign)
    ratio_i = ||f_i|| / ||h_i||     how much the block changes the representation

Residual nets: f_i is the residual branch output (as the forward pass uses it), g_i =
dL/dh_i. A downsampling block's branch has the output's shape, so its reference point is
the shortcut output s_i = shortcut(h_i), where the branch is added: ratio ||f_i||/||s_i||,
g_i = dL/ds_i (the row says so). Post-activation blocks apply a ReLU after the sum, so f_i
is the pre-ReLU step. Plain nets have no branch to isolate: f_i is the block's change,
output - input, where the shapes match; their downsampling blocks are not applicable.

One forward and one backward per batch serve all blocks: the blocks are walked with the
model's own `branch`/`shortcut`/`merge`, and one `autograd.grad` gives every g_i.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..stats import Running
from ..study import Measure, Section, Study, plot_along_depth, position_rows, save_figure

NAME = "iterative"
COSINE = Measure("cos(f, dL/dh)", 4)  # values of order 1e-3: two decimals showed 0.00 ± 0.00
RATIO = Measure("||f|| / ||h||", 3)
MAX_BATCH = 128  # images per forward/backward (the graph of every block is held at once)


def block_steps(model, x: Tensor, y: Tensor) -> list[dict[str, Any]]:
    """Per block (forward order): {"cos": (B,), "ratio": (B,), "grad_norm": (B,)} per image, or
    cos None where the block is not applicable, and "reference": what f and g are taken at.
    "ok" marks the images whose cosine is defined (||f|| > 0 and ||g|| > 0: a block that does
    not move an image, or a saturated softmax, gives no direction); "ratio_ok" those with ||h|| > 0."""
    if model.training:
        raise ValueError("the iterative study runs in eval mode (BN running statistics)")
    with torch.enable_grad():
        h = model.forward_stem(x).detach().requires_grad_()
        taken = []  # (step f or None, reference point r, gradient point)
        for pos, blk in enumerate(model.blocks):
            b = blk.branch(h)
            if blk.plain:
                out = blk.merge(b, None)
                same = out.shape == h.shape
                taken.append((out - h if same else None, h, h, "output - input" if same else "not applicable"))
            else:
                s = blk.shortcut(h)
                out = blk.merge(b, s)
                taken.append((b, s, s, "branch at the input" if s is h else "branch at the shortcut output"))
            h = model.after(pos, out)  # a transition between stages (ConvNeXt) comes before the next input
        # The loss in float64: 1 - p of a confident image underflows in float32, leaving its
        # gradient mostly rounding error; in float64 its direction survives the float32 backward.
        loss = F.cross_entropy(model.forward_head(h).double(), y, reduction="sum")
        grads = torch.autograd.grad(loss, [g for _, _, g, _ in taken])
    out = []
    with torch.no_grad():
        for (f, r, _, how), g in zip(taken, grads):
            gn = g.flatten(1).double().norm(dim=1)
            if f is None:
                out.append({"cos": None, "ratio": None, "grad_norm": gn, "reference": how, "ok": None})
                continue
            f, r, g = f.flatten(1).double(), r.flatten(1).double(), g.flatten(1).double()
            fn, rn = f.norm(dim=1), r.norm(dim=1)
            cos = (f * g).sum(1) / (fn * gn)
            ratio = fn / rn
            out.append({"cos": cos, "ratio": ratio, "grad_norm": gn, "reference": how, "ok": (fn > 0) & (gn > 0),
                        "ratio_ok": rn > 0})  # fmt: skip
    return out


class Iterative(Study):
    name = NAME
    metrics = {
        "iterative_mean_cos": "mean over blocks of cos(f_i, dL/dh_i) (negative: the blocks step down the loss)",
        "iterative_mean_ratio": "mean over blocks of ||f_i|| / ||h_i||",
    }

    def run(self, ctx) -> None:
        ctx.whole(lambda: self.rows(ctx))

    def rows(self, ctx) -> list[dict]:
        model = ctx.model
        cos = [Running() for _ in model.block_names]
        ratio = [Running() for _ in model.block_names]
        how, images, seen = [""] * len(cos), 0, [False] * len(cos)
        for x, y in ctx.batches():
            for i in range(0, len(y), MAX_BATCH):
                xb, yb = x[i : i + MAX_BATCH], y[i : i + MAX_BATCH]
                for j, s in enumerate(block_steps(model, xb, yb)):
                    how[j] = s["reference"]
                    if s["cos"] is not None:  # only images with a defined cosine / ratio count
                        cos[j].add(s["cos"][s["ok"]])
                        ratio[j].add(s["ratio"][s["ratio_ok"]])
                        seen[j] = True
            images += len(y)
            if ctx.progress:
                ctx.progress(len(y))
        down = set(model.downsample_blocks)
        rows = []
        for j, b in enumerate(model.block_names):
            ok = seen[j] and ratio[j].n > 0
            rows.append(
                ctx.row(
                    key=b,
                    block=b,
                    position=j,
                    downsample=b in down,
                    applicable=ok,
                    reference=how[j],
                    cos_mean=cos[j].mean if cos[j].n else None,
                    cos_std=cos[j].std if cos[j].n else None,
                    cos_n=cos[j].n,
                    ratio_mean=ratio[j].mean if ok else None,
                    ratio_std=ratio[j].std if ok else None,
                    ratio_n=ratio[j].n,
                    images=images,
                )  # fmt: skip
            )
        return rows

    def summary(self, rows: list[dict]) -> dict[str, float]:
        ok = [r for r in self.mine(rows) if r.get("applicable") and r.get("cos_mean") is not None]
        if not ok:
            return {}
        return {
            "lesion/iterative_mean_cos": sum(r["cos_mean"] for r in ok) / len(ok),
            "lesion/iterative_mean_ratio": sum(r["ratio_mean"] for r in ok) / len(ok),
        }

    def measure(self, key: str) -> Measure:
        return COSINE if key.startswith("cos ") else RATIO

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        if not row.get("applicable") or row.get("cos_mean") is None:
            return []
        return [(f"cos {row['block']}", row["cos_mean"]), (f"ratio {row['block']}", row["ratio_mean"])]

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        mine = self.mine(rows)
        if not mine:
            return []

        def cell(r: dict) -> str:
            if not r["applicable"]:
                return "not applicable"
            return f"{r['cos_mean']:+.3f} ± {r['cos_std']:.3f} | {r['ratio_mean']:.3f} ± {r['ratio_std']:.3f}"

        cks = list(dict.fromkeys(r["checkpoint"] for r in mine))
        body = position_rows(mine, range(max(r["position"] for r in mine) + 1), cell)
        note = (
            "Per block, mean ± std over the evaluation images (images whose softmax saturated, with a zero "
            "gradient, are left out of the cosine: `cos_n` in results.csv): cos(f, dL/dh) (negative: the block "
            "steps down the loss; the cosine with -dL/dh is its negation), then ||f|| / ||h||. f is the residual "
            "branch output (plain nets: output - input), taken at the block input, or for a downsampling block at its "
            "shortcut output. One forward and one backward per batch (Jastrzebski et al. 2018)."
        )
        head = ["position", "block", *[f"{ck}: cos | ratio" for ck in cks]]
        return [Section("Iterative refinement: each block's step against the loss gradient", [note], (head, body))]

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        mine = [r for r in self.mine(rows) if r.get("applicable") and r.get("cos_mean") is not None]
        if not mine:
            return None
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
        for ck in dict.fromkeys(r["checkpoint"] for r in mine):
            rs = sorted((r for r in mine if r["checkpoint"] == ck), key=lambda r: r["position"])
            n = max(1, max(r["position"] for r in self.mine(rows) if r["checkpoint"] == ck))
            x = [r["position"] / n for r in rs]
            a1.errorbar(x, [r["cos_mean"] for r in rs], [r["cos_std"] for r in rs], fmt="o-", ms=3, capsize=2,
                        color=colour[ck], label=ck)  # fmt: skip
            a2.semilogy(x, [r["ratio_mean"] for r in rs], "o-", ms=3, color=colour[ck], label=ck)
            for ax, key in ((a1, "cos_mean"), (a2, "ratio_mean")):
                down = [r for r in rs if r["downsample"]]
                ax.scatter([r["position"] / n for r in down], [r[key] for r in down], s=120, facecolors="none",
                           edgecolors=colour[ck])  # fmt: skip
        a1.axhline(0, color="gray", lw=1, ls=":")
        a1.set(xlabel="block position (0 = first, 1 = last)", ylabel="cos(f, dL/dh)",
               title="Step vs loss gradient (mean ± std over images)")  # fmt: skip
        a2.set(xlabel="block position (0 = first, 1 = last)", ylabel="||f|| / ||h|| (log)",
               title="Relative size of each block's step (circled: downsampling)")  # fmt: skip
        for ax in (a1, a2):
            ax.legend(fontsize=7)
        return save_figure(fig, out / "iterative.png")

    def plot_pooled(self, ax, agg: list[dict], colour: str, label: str) -> bool:
        cos = [a for a in agg if a["key"].startswith("cos ")]
        return plot_along_depth(
            ax,
            cos,
            colour,
            label,
            xlabel="block position (0 = first, 1 = last)",
            ylabel="cos(f, dL/dh)",
            title="Iterative refinement: mean ± std over checkpoints",
        )
