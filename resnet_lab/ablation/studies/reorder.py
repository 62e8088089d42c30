"""`reorder`: swap shape-compatible blocks at test time (Veit et al. 2016, Sec. 4.3 / Fig. 4).

Rows: `samples` random orders at each level of 1, 2, 4, ... swaps, with Kendall's tau to
the trained order. A net of B blocks gets the first max(1, B // 2) levels of 1, 2, 4, 8, 16,
32 (see `swap_levels`): resnet-8 (3 blocks) 1 swap; resnet-14 (6) 1, 2, 4; resnet-20 (9)
1, 2, 4, 8; resnet-56 (27) and deeper all six, up to 32 swaps. A swap exchanges two
shape-compatible blocks, so a count above the blocks only mixes the order further. Nets
without two blocks of the same shape (resnet-8: one block a stage) have no rows and the
report names them; when no net has two, the study is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import engine
from ..study import AblationError, Section, Study, as_specs, save_figure

NAME = "reorder"
SWAP_LEVELS = (1, 2, 4, 8, 16, 32)


def swap_levels(blocks: int) -> tuple[int, ...]:
    """The swap counts a net of `blocks` blocks is reordered at: the first max(1, blocks // 2) levels."""
    return SWAP_LEVELS[: max(1, min(len(SWAP_LEVELS), blocks // 2))]


def unswappable(nets: list[Any]) -> list[str]:
    """Names of the nets (specs, or a report's checkpoint entries) with no two shape-compatible
    blocks, each built without memory on the meta device."""
    import torch

    from ...models import build

    with torch.device("meta"):
        return list(dict.fromkeys(s.name for s in as_specs(nets) if not build(s).swappable_groups()))


class Reorder(Study):
    name = NAME

    def check(self, specs, options, common) -> None:
        lacking = unswappable(specs)
        if specs and len(lacking) == len({s.name for s in specs}):
            names = ", ".join(lacking)
            raise AblationError(f"reorder: none of these nets has two shape-compatible blocks to swap ({names}): "
                                "use a deeper net (resnet14 or more), or drop reorder")  # fmt: skip

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        lacking = unswappable(meta["checkpoints"])
        if not lacking:
            return []
        note = f"Not reordered: {', '.join(lacking)} (no two shape-compatible blocks). Rows: results.csv."
        return [Section("Block reordering (Veit et al. Fig. 4)", [note])]

    def run(self, ctx) -> None:
        model, c = ctx.model, ctx.common
        if not model.swappable_groups():
            return
        for swaps in swap_levels(len(model.block_names)):
            ctx.lesions(f"swaps{swaps}", engine.reorder_conditions(model, swaps, c.samples, c.seed))

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        by: dict[tuple[str, str], list[dict]] = {}
        for r in self.mine(rows):
            by.setdefault((r["checkpoint"], r["condition"]), []).append(r)
        if not by:
            return None
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for (ck, cond), rs in by.items():
            ax.scatter([r["tau"] for r in rs], [r["error"] for r in rs], s=12, color=colour[ck], label=f"{ck} [{cond}]")
        ax.set(xlabel="Kendall tau to the original order", ylabel="error (%)", title="Error vs block reordering")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
        return save_figure(fig, out / "reorder.png")
