"""`reorder`: swap shape-compatible blocks at test time (Veit et al. 2016, Sec. 4.3 / Fig. 4).

Rows: for 1, 2, 4, ... swaps (up to half the blocks, at most 32), `samples` random
orders each, with Kendall's tau to the trained order. Nets without two blocks of the
same shape have no rows.
"""

from __future__ import annotations

from pathlib import Path

from .. import engine
from ..study import Study, save_figure

NAME = "reorder"
SWAP_LEVELS = (1, 2, 4, 8, 16, 32)


class Reorder(Study):
    name = NAME

    def run(self, unit) -> None:
        model, o = unit.model, unit.opts
        if not model.swappable_groups():
            return
        for swaps in SWAP_LEVELS[: max(1, min(len(SWAP_LEVELS), len(model.block_names) // 2))]:
            unit.conditions(NAME, f"swaps{swaps}", engine.reorder_conditions(model, swaps, o.samples, o.seed))

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
