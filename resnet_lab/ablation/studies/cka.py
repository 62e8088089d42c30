"""`cka`: representation similarity across depth (Kornblith et al. 2019, linear CKA;
Nguyen et al. 2021, the minibatch estimator).

For two representations of the same images (the flattened output of the stem or of a
block), linear CKA compares their Gram matrices K = X X^T and L = Y Y^T:

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

Over the evaluation images in minibatches of CKA_BATCH, HSIC is the unbiased estimator of
Song et al. (2012), summed over minibatches (Nguyen et al. 2021, Eq. 3), so memory holds
one minibatch's Gram matrices and the running sums, whatever the number of images.

Comparisons, each a matrix over (stem, block 1 .. n) x (stem, block 1 .. n):
  - "within": every pair of representations of one net;
  - "vs <label>": this net against each checkpoint given before it on the command line
    (resnet20 vs resnet56, seed 0 vs seed 1, residual vs plain), on the same images;
  - "without <block>" (--cka-without): the net against itself with that block removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import engine
from ..study import AblationError, Measure, Section, Study, option, plot_along_depth, save_figure

NAME = "cka"
CKA_MEASURE = Measure("linear CKA", 3)
CKA_BATCH = 256  # images per minibatch (the unbiased estimator needs at least 4)


@dataclass(frozen=True)
class Options:
    cka_without: tuple[str, ...] | None = option(
        None, "cka: also compare each net with itself with each of these blocks removed", "names", metavar="BLOCK"
    )


def grams(reps: list[Tensor]) -> Tensor:
    """(R, B, B) float64 Gram matrices of R representations of one minibatch (B, ...)."""
    return torch.stack([(x := h.flatten(1).double()) @ x.T for h in reps])


def hsic1(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 (the papers' names)
    """Unbiased HSIC of every pair: k (R1, n, n), l (R2, n, n) -> (R1, R2) (Song et al. 2012)."""
    n = k.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 images, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k, l = k.masked_fill(eye, 0), l.masked_fill(eye, 0)  # noqa: E741
    trace = k.flatten(1) @ l.flatten(1).T  # tr(K L) for symmetric K, L
    sums = torch.outer(k.sum((1, 2)), l.sum((1, 2))) / ((n - 1) * (n - 2))
    cross = k.sum(2) @ l.sum(1).T * (2 / (n - 2))  # 1^T K L 1
    return (trace + sums - cross) / (n * (n - 3))


class CKAAccumulator:
    """Running sums of minibatch HSIC between representations A (R1) and B (R2)."""

    def __init__(self) -> None:
        self.ab = self.aa = self.bb = None
        self.images = 0

    def add(self, ka: Tensor, kb: Tensor) -> None:
        ab, aa = hsic1(ka, kb), torch.diagonal(hsic1(ka, ka))
        bb = aa if kb is ka else torch.diagonal(hsic1(kb, kb))
        self.ab = ab if self.ab is None else self.ab + ab
        self.aa = aa if self.aa is None else self.aa + aa
        self.bb = bb if self.bb is None else self.bb + bb
        self.images += ka.shape[-1]

    def cka(self) -> Tensor:
        return self.ab / torch.sqrt(torch.outer(self.aa, self.bb))


def minibatch_cka(reps_a: list[list[Tensor]], reps_b: list[list[Tensor]] | None = None) -> Tensor:
    """CKA of every pair of representations, from per-minibatch lists of representations."""
    acc = CKAAccumulator()
    for i, a in enumerate(reps_a):
        ka = grams(a)
        acc.add(ka, ka if reps_b is None else grams(reps_b[i]))
    return acc.cka()


def _chunks(batches):
    """Minibatches of exactly CKA_BATCH images whatever --batch-size (the estimate depends on
    the minibatch size), then the rest if it holds at least 4 (the rows count the images)."""
    buf: list[Tensor] = []
    for x, _ in batches:
        buf.append(x)
        while sum(len(b) for b in buf) >= CKA_BATCH:
            x = torch.cat(buf)
            yield x[:CKA_BATCH]
            buf = [x[CKA_BATCH:]]
    rest = torch.cat(buf) if buf else None
    if rest is not None and len(rest) >= 4:
        yield rest


class CKA(Study):
    name = NAME
    Options = Options
    metrics = {
        "cka_adjacent_mean": "mean CKA of consecutive representations (stem, block 1, ...) within the net",
        "cka_first_last": "CKA of the stem output and the last block's output",
    }

    def check(self, specs, options, common) -> None:
        if common.limit is not None and common.limit < 4:
            raise AblationError(
                f"cka needs at least 4 images (the unbiased HSIC estimator); --limit {common.limit} gives "
                f"{common.limit}: raise --limit"
            )

    def check_model(self, model, options, common) -> None:
        unknown = [b for b in options.cka_without or () if b not in model.block_names]
        if unknown:
            raise AblationError(
                f"--cka-without {unknown}: no such block in {model.spec.name}; valid: {', '.join(model.block_names)}"
            )

    def run(self, ctx) -> None:
        model = ctx.model
        without = list(ctx.options.cka_without or ())
        peers = ctx.peers[: ctx.peers.index(ctx.ckpt)]  # the checkpoints given before this one
        todo = {"within": None, **{f"vs {c.label}": c.model for c in peers}, **{f"without {b}": b for b in without}}
        todo = {k: v for k, v in todo.items() if not ctx.done(k)}
        if not todo:
            return
        lesioned = ctx.scratch() if any(isinstance(v, str) for v in todo.values()) else None
        accs = {k: CKAAccumulator() for k in todo}
        names = ["stem", *model.block_names]
        for x in _chunks(ctx.batches()):
            reps = [h for _, h in engine.representations(model, x)]
            k_self = grams(reps)
            for comp, what in todo.items():
                if what is None:
                    accs[comp].add(k_self, k_self)
                elif isinstance(what, str):
                    with lesioned.remove_blocks([what]):
                        accs[comp].add(k_self, grams([h for _, h in engine.representations(lesioned, x)]))
                else:
                    accs[comp].add(k_self, grams([h for _, h in engine.representations(what, x)]))
            if ctx.progress:
                ctx.progress(len(x))
        for comp, acc in accs.items():
            peer = todo[comp]
            cols = ["stem", *peer.block_names] if peer is not None and not isinstance(peer, str) else names
            ctx.add(comp, self._rows(ctx, comp, names, cols, acc))

    def _rows(self, ctx, comp: str, names: list[str], cols: list[str], acc: CKAAccumulator) -> list[dict]:
        m = acc.cka()
        rows = []
        for i, a in enumerate(names):
            for j, b in enumerate(cols):
                if comp == "within" and j < i:
                    continue  # symmetric: the upper triangle and the diagonal
                rows.append(ctx.row(key=f"{comp}: {a} ~ {b}", comparison=comp, rep_a=a, rep_b=b, pos_a=i - 1,
                                    pos_b=j - 1, cka=float(m[i, j]), images=acc.images))  # fmt: skip
        return rows

    @staticmethod
    def matrices(rows: list[dict]) -> dict[tuple[str, str], Tensor]:
        """{(checkpoint, comparison): the full CKA matrix (rows: this net's representations)}."""
        cells: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
        for r in rows:
            if r["study"] == NAME:
                cells.setdefault((r["checkpoint"], r["comparison"]), {})[(r["pos_a"] + 1, r["pos_b"] + 1)] = r["cka"]
        out = {}
        for key, c in cells.items():
            n, m = max(i for i, _ in c) + 1, max(j for _, j in c) + 1
            mat = torch.full((n, m), math.nan, dtype=torch.float64)
            for (i, j), v in c.items():
                mat[i, j] = v
                if key[1] == "within":
                    mat[j, i] = v
            out[key] = mat
        return out

    def summary(self, rows: list[dict]) -> dict[str, float]:
        mats = [m for (_, comp), m in self.matrices(rows).items() if comp == "within"]
        if len(mats) != 1:
            return {}
        m = mats[0]
        adjacent = torch.diagonal(m, 1)
        return {"lesion/cka_adjacent_mean": float(adjacent.mean()), "lesion/cka_first_last": float(m[0, -1])}

    def measure(self, key: str) -> Measure:
        return CKA_MEASURE

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        if row["comparison"] == "within" and row["pos_b"] == row["pos_a"] + 1:
            return [(f"cka {row['rep_a']} ~ {row['rep_b']}", row["cka"])]
        return []

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        mats = self.matrices(rows)
        if not mats:
            return []
        images = next(r["images"] for r in rows if r["study"] == NAME)
        body = []
        for (ck, comp), m in mats.items():
            adjacent = torch.diagonal(m, 1) if comp == "within" else torch.diagonal(m)
            body.append([ck, comp, f"{m.shape[0]} x {m.shape[1]}", f"{float(adjacent.mean()):.3f}",
                         f"{float(m.nanmean()):.3f}", f"{float(m[0, -1]):.3f}"])  # fmt: skip
        note = (
            f"Linear CKA (Kornblith et al. 2019) of the flattened outputs of the stem and of every block, on {images} "
            f"evaluation images in minibatches of {CKA_BATCH}, with the unbiased minibatch HSIC (Nguyen et al. "
            "2021). 'along the diagonal': consecutive representations within a net, or the same position in the "
            "two compared nets. Heatmaps: cka.png; every pair: results.csv."
        )
        head = ["checkpoint", "comparison", "representations", "along the diagonal", "mean", "stem ~ last"]
        return [Section("Representation similarity (linear CKA)", [note], (head, body))]

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        mats = self.matrices(rows)
        if not mats:
            return None
        import matplotlib.pyplot as plt

        cols = min(4, len(mats))
        nrows = -(-len(mats) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.6 * nrows), squeeze=False)
        for ax in axes.flat[len(mats) :]:
            ax.axis("off")
        for ax, ((ck, comp), m) in zip(axes.flat, mats.items()):
            im = ax.imshow(m.numpy(), vmin=0, vmax=1, origin="lower", cmap="magma", aspect="auto")
            ax.set_title(f"{ck}\n{comp}", fontsize=7)
            ax.set(xlabel="representation (0 = stem)", ylabel="representation (0 = stem)")
            fig.colorbar(im, ax=ax, fraction=0.046)
        return save_figure(fig, out / "cka.png")

    def plot_pooled(self, ax, agg: list[dict], colour: str, label: str) -> bool:
        return plot_along_depth(
            ax,
            agg,
            colour,
            label,
            xlabel="position (0 = stem ~ block 1, 1 = last pair)",
            ylabel="CKA of consecutive outputs",
            title="CKA along depth: mean ± std over checkpoints",
        )
