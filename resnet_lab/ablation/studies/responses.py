"""`responses`: the std of each 3x3 layer's response after BN (He et al. 2015, Fig. 7).

Rows: one per 3x3 layer, in forward order, averaged over the first batches of the split.
ViTs and ConvNeXts have no BN after their layers: there a row is one unit, the std of its
residual branch f(x) (what the update adds to the stream; `model.response_stds`).
"""

from __future__ import annotations

from pathlib import Path

from .. import engine
from ..study import Study, save_figure

NAME = "responses"


class Responses(Study):
    name = NAME
    default = True

    def run(self, ctx) -> None:
        ctx.whole(lambda: self.rows(ctx))

    def rows(self, ctx) -> list[dict]:
        stds = engine.response_stds(ctx.model, ctx.batches())
        return [ctx.row(key=layer, layer_index=i, std=v) for i, (layer, v) in enumerate(stds.items())]

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        by: dict[str, list[dict]] = {}
        for r in self.mine(rows):
            by.setdefault(r["checkpoint"], []).append(r)
        if not by:
            return None
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for ck, rs in by.items():
            rs = sorted(rs, key=lambda r: r["layer_index"])
            ax.plot([r["layer_index"] for r in rs], [r["std"] for r in rs], "o-", ms=3, color=colour[ck], label=ck)
        ax.set(xlabel="3x3 layer index (ViT, ConvNeXt: unit index)", ylabel="std of response",
               title="Layer responses (after BN, He et al. Fig. 7; ViT, ConvNeXt: each unit's branch)")  # fmt: skip
        ax.legend(fontsize=7)
        return save_figure(fig, out / "responses.png")
