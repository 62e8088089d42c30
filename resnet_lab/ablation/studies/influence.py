"""`influence`: how much each unit changes the stream it updates (ShortGPT's block influence).

Men et al. 2024 (ShortGPT) rank a transformer's layers for removal by their block
influence, BI_i = 1 - E[cos(x_i, x_{i+1})], the expected cosine between a layer's input and
output over tokens; Gromov et al. 2024 use the same angle over spans. Here it is computed
for every unit of every family, at each position of the representation: a token (ViT), a
pixel's channel vector (ResNet, ConvNeXt). The input is what the unit's shortcut carries
(a ResNet downsampling block's reshaped input, so both sides have one shape). A low value:
the unit barely turns the stream (removing it should cost little, the ensemble view's
prediction); near 1: the unit replaces it (as every layer of a plain net must).

Rows: one per unit, with the mean over images of each image's positional mean, and its
std over images, on the evaluation split (`--split`, `--limit`), from one forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..stats import Running
from ..study import Measure, Section, Study, plot_along_depth, save_figure

NAME = "influence"
INFLUENCE = Measure("block influence, 1 - cos(in, out)", 4)


def per_image(skip: Tensor, out: Tensor) -> Tensor:
    """(B,) mean over positions of 1 - cos(skip, out), the vectors along the channel
    (or token-width) axis: dim 1 of (B, C, H, W), the last of (B, T, D)."""
    dim = 1 if out.ndim == 4 else -1
    cos = F.cosine_similarity(skip.double(), out.double(), dim=dim, eps=1e-12)
    return (1 - cos).flatten(1).mean(1)


class Influence(Study):
    name = NAME
    metrics = {"influence_mean": "mean over units of the block influence 1 - cos(input, output) (ShortGPT)"}

    def run(self, ctx) -> None:
        ctx.whole(lambda: self.rows(ctx))

    def rows(self, ctx) -> list[dict]:
        model = ctx.model
        acc = {b: Running() for b in model.block_names}
        images = 0
        for x, _ in ctx.batches():
            for name, skip, out in model.unit_io(x):
                acc[name].add(per_image(skip, out))
            images += len(x)
            if ctx.progress:
                ctx.progress(len(x))
        down = set(model.downsample_blocks)
        return [
            ctx.row(
                key=b,
                block=b,
                position=j,
                downsample=b in down,
                influence=acc[b].mean,
                influence_std=acc[b].std,
                images=images,
            )  # fmt: skip
            for j, b in enumerate(model.block_names)
        ]

    def summary(self, rows: list[dict]) -> dict[str, float]:
        mine = self.mine(rows)
        return {"lesion/influence_mean": sum(r["influence"] for r in mine) / len(mine)} if mine else {}

    def measure(self, key: str) -> Measure:
        return INFLUENCE

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        return [(f"influence {row['block']}", row["influence"])]

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        mine = self.mine(rows)
        if not mine:
            return []
        cks = list(dict.fromkeys(r["checkpoint"] for r in mine))
        body = []
        for ck in cks:
            rs = sorted((r for r in mine if r["checkpoint"] == ck), key=lambda r: r["position"])
            top = sorted(rs, key=lambda r: r["influence"])
            body.append([ck, str(len(rs)), f"{sum(r['influence'] for r in rs) / len(rs):.4f}",
                         f"{top[0]['block']} ({top[0]['influence']:.4f})",
                         f"{top[-1]['block']} ({top[-1]['influence']:.4f})"])  # fmt: skip
        note = (
            f"Block influence (Men et al. 2024, ShortGPT): 1 - cos(input, output) of each unit, per position (token, "
            f"or pixel's channel vector), mean over positions, then over the {mine[0]['images']} evaluation images; "
            "a downsampling ResNet block's input is taken as its shortcut output. Low: the unit barely turns the "
            "stream, the first to remove by ShortGPT's rule. Every unit: results.csv (influence, influence_std); "
            "along depth: influence.png."
        )
        head = ["checkpoint", "units", "mean influence", "lowest", "highest"]
        return [Section("Block influence: how much each unit turns the stream", [note], (head, body))]

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        mine = self.mine(rows)
        if not mine:
            return None
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for ck in dict.fromkeys(r["checkpoint"] for r in mine):
            rs = sorted((r for r in mine if r["checkpoint"] == ck), key=lambda r: r["position"])
            x = [r["position"] / max(1, len(rs) - 1) for r in rs]
            ax.errorbar(x, [r["influence"] for r in rs], [r["influence_std"] for r in rs], fmt="o-", ms=3,
                        capsize=2, color=colour[ck], label=ck)  # fmt: skip
        ax.set(xlabel="unit position (0 = first, 1 = last)", ylabel="1 - cos(input, output)",
               title="Block influence (ShortGPT), mean ± std over images")  # fmt: skip
        ax.legend(fontsize=7)
        return save_figure(fig, out / "influence.png")

    def plot_pooled(self, ax, agg: list[dict], colour: str, label: str) -> bool:
        labels = dict(xlabel="unit position (0 = first, 1 = last)", ylabel="1 - cos(input, output)",
                      title="Block influence: mean ± std over checkpoints")  # fmt: skip
        return plot_along_depth(ax, agg, colour, label, **labels)
