"""What a study gets for one checkpoint: `Study.run(ctx)`.

A `Context` holds one checkpoint and one study's view of the run:

    ctx.options      the study's own typed Options (checked once, with the run's)
    ctx.common       the options every study shares (split, blocks, samples, seed, limit)
    ctx.model        the checkpoint's network, eval mode, shared: read it, never change it
    ctx.device       where it is (--device); every batch and image below arrives there
    ctx.unit(name)   a resumable unit of rows (stored when its body finishes; skipped when done)
    ctx.lesions(..)  network variants evaluated with an explicit BN mode, prefix-shared
    ctx.batches()    the evaluation split (the run's --split and --limit)
    ctx.sample(..)   a seeded sample of a split (e.g. training images), no augmentation
    ctx.images(n)    the images of the geometry studies: a seeded sample of n training
                     images, or with --limit the same first images every other study uses
    ctx.loss(..)     the checkpoint's own training loss (cross-entropy with its smoothing)
    ctx.parameters() a detached copy of the parameters, to perturb
    ctx.functional() the network as a function of such a dict (torch.func.functional_call)
    ctx.scratch()    a private copy of the network, to mutate (e.g. re-estimate its BN)

so that no study mutates the model others read, and none re-implements the network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import engine
from .engine import Condition
from .stats import wilson
from .study import common_of

if TYPE_CHECKING:
    from .runner import Loaded, Store
    from .study import Study

# BN modes of an evaluation, and the `condition` value of their rows (results.csv).
BN_MODES = {"eval": "eval-bn", "recalibrated": "recalibrated-bn"}


def bn_condition(bn: str) -> str:
    if bn not in BN_MODES:
        raise ValueError(f"BN mode {bn!r}: use one of {', '.join(BN_MODES)}")
    return BN_MODES[bn]


class Context:
    """One study's view of one checkpoint (see the module docstring)."""

    def __init__(
        self, study: Study, ckpt: Loaded, dm, store: Store, opts: Any, progress=None, peers: list[Loaded] = ()
    ) -> None:
        self.study, self.ckpt, self.dm, self._store, self.progress = study, ckpt, dm, store, progress
        self.options = study.options(opts)
        self.common = common_of(opts)
        self.peers = list(peers) or [ckpt]  # every checkpoint of this run, in command-line order
        self.model = ckpt.model
        self.device = next(ckpt.model.parameters()).device
        self.spec = ckpt.spec
        self.blocks = list(dict.fromkeys(self.common.blocks)) if self.common.blocks else ckpt.model.block_names

    # -- resumable units ----------------------------------------------------------------
    def key(self, unit: str, bn: str = "eval", study: str | None = None) -> str:
        """A unit's key in results.jsonl: finished units are skipped on a rerun."""
        return f"{self.ckpt.label}|{study or self.study.name}|{unit}|{bn_condition(bn)}"

    def done(self, unit: str, bn: str = "eval") -> bool:
        return self.key(unit, bn) in self._store.done

    def unit(self, name: str, bn: str = "eval") -> Iterator[list[dict]]:
        """`for rows in ctx.unit(name): rows += ...`: the body runs once, unless the unit is
        already stored, and its rows are stored (fsynced) when it finishes; an exception or a
        kill stores nothing, so a rerun computes it again. (A `with` block cannot be skipped.)"""
        key = self.key(name, bn)
        if key in self._store.done:
            return
        rows: list[dict] = []
        yield rows
        self._store.add(key, rows)

    def add(self, unit: str, rows: list[dict], bn: str = "eval") -> None:
        """Store a unit computed outside `unit` (e.g. several units from one pass over the data)."""
        self._store.add(self.key(unit, bn), rows)

    def whole(self, compute: Callable[[], list[dict]]) -> None:
        """A study whose one unit is the whole checkpoint: `compute()` -> its rows, unless done."""
        for rows in self.unit("all"):
            rows += compute()

    def row(self, bn: str = "eval", **values: Any) -> dict[str, Any]:
        c = self.ckpt
        return {
            "checkpoint": c.label,
            "spec": c.spec.name,
            "arch": c.arch,
            "plain": c.spec.plain,
            "study": self.study.name,
            "condition": bn_condition(bn),
            **values,
        }

    # -- data -----------------------------------------------------------------------------
    def batches(self, split: str | None = None, limit: int | None = None):
        """The evaluation split's batches (default: the run's --split and --limit)."""
        from .runner import batches

        o = self.common
        return batches(self.dm, split or o.split, limit if split else o.limit, device=self.device)

    def sample(self, split: str, n: int, seed: int | None = None):
        """Batches of `n` images of `split` drawn at random from `seed` (default: the run's
        --seed), the same whatever the process environment; no augmentation."""
        from .runner import batches

        seed = self.common.seed if seed is None else seed
        return batches(self.dm, split, loader=self.dm.sample_dataloader(split, n, seed), device=self.device)

    def images(self, n: int, seed_offset: int = 0) -> tuple[Tensor, Tensor, str]:
        """(x, y, what) of the geometry studies: n training images drawn from --seed (plus
        `seed_offset`, for a second, disjoint-by-seed sample), or with --limit the first
        --limit images of --split that every other study evaluates."""
        seed = self.common.seed + seed_offset
        if self.common.limit is not None:
            xs, ys = zip(*self.batches())
        else:
            xs, ys = zip(*self.sample("train", n, seed))
        x, y = torch.cat(xs), torch.cat(ys)
        if self.common.limit is not None:
            return x, y, f"the first {len(y)} images of the {self.common.split} split"
        return x, y, f"{len(y)} training images drawn with seed {seed} (no augmentation)"

    # -- evaluation -----------------------------------------------------------------------
    def loss(self, logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """The checkpoint's training loss: cross-entropy with its label smoothing."""
        return F.cross_entropy(logits, y, reduction=reduction, label_smoothing=self.ckpt.label_smoothing)

    def lesions(self, unit: str, conds: list[Condition], bn: str = "eval", bn_images: int | None = None) -> None:
        """One unit of network variants (blocks removed or reordered): error, loss and Wilson
        interval of each. bn="eval" keeps the checkpoint's running statistics (prefix-shared
        evaluation); bn="recalibrated" re-estimates them on `bn_images` training images after
        each change, on a private copy."""
        for rows in self.unit(unit, bn):
            tallies = self._tallies(conds, bn, bn_images)
            for c in conds:
                t = tallies[c.key]
                lo, hi = wilson(t.wrong, t.n)
                rows.append(self.row(bn, key=c.key, error=t.error, loss=t.mean_loss, n=t.n, wrong=t.wrong,
                                     error_ci_lo=lo, error_ci_hi=hi, **c.meta))  # fmt: skip

    def _tallies(self, conds: list[Condition], bn: str, bn_images: int | None) -> dict[str, engine.Tally]:
        if bn == "eval":
            return engine.evaluate(self.model, self.batches(), conds, self.progress)
        if not bn_images:
            raise ValueError("recalibrated BN needs bn_images >= 1")
        tallies = {}
        for c in conds:
            m = self.scratch()
            with m.remove_blocks(c.removed):
                engine.recalibrate_bn(m, self.sample("train", bn_images), engine.first_changed(m, c))
                tallies.update(engine.evaluate(m, self.batches(), [c], self.progress))
        return tallies

    # -- perturbable weights --------------------------------------------------------------
    def parameters(self) -> dict[str, Tensor]:
        """A detached copy of every parameter, by name: perturb it freely."""
        return {k: p.detach().clone() for k, p in self.model.named_parameters()}

    def functional(self, buffers: dict[str, Tensor] | None = None) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
        """`f(params, x) -> logits`: the network with `params` in place of its own (BN in eval
        mode, with the checkpoint's running statistics unless `buffers` replaces them)."""
        buf = dict(self.model.named_buffers()) if buffers is None else buffers

        def f(params: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(self.model, {**buf, **params}, (x,))

        return f

    def scratch(self):
        """A private deep copy of the network (eval mode): mutate it, never the shared one."""
        return copy.deepcopy(self.model).eval()
