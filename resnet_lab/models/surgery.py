"""Reversible test-time surgery shared by every family of the zoo (Veit et al. 2016).

A network is a stem, a sequence of *units* (residual updates: a ResNet block, one of
the two sublayers of a ViT encoder layer, a ConvNeXt block) and a head. `UnitNet` keeps
the units in a plain tuple (they are registered once, under their torchvision names) and
offers the surgery every study uses:

  - `block_names`: the units' stable names, in the original forward order;
  - `with model.remove_blocks(names):` the named units skip their residual branch;
  - `with model.reorder_blocks(names):` the units run in another shape-compatible order;
  - `forward_until(x, i)` / `forward_from(h, i)`: the input of unit position i, and the
    logits from there on, so a lesion engine can reuse an unchanged prefix.

Layers that are not residual (a ConvNeXt downsampling layer between stages) are
*transitions*: they belong to a position, not to a unit, run after the unit at that
position, and are never removed or moved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


class StreamUpdate(nn.Module):
    """One residual update of a token or feature stream: y = x + f(x) (plain: y = f(x)).

    Same-shape by construction, so a removed update is y = x exactly (plain too: there
    is no other mapping to fall back on). `branch`, `shortcut` and `merge` are the
    pieces the path and iterative-inference studies recombine."""

    plain: bool
    removed: bool
    downsample = None  # no shortcut mapping: the skip is the identity
    removed_as = "identity"

    def residual(self, x: Tensor) -> Tensor:
        """f(x) as trained, without stochastic depth."""
        raise NotImplementedError

    def branch(self, x: Tensor) -> Tensor:
        return self.residual(x)

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def merge(self, branch: Tensor | None, skip: Tensor | None) -> Tensor:
        """The update's output from its two paths; branch None = removed (f = 0)."""
        if branch is None:
            return skip
        return branch if self.plain else branch + skip

    def lesioned(self, x: Tensor) -> Tensor:
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.removed:
            return x
        return self.merge(self.branch(x), None if self.plain else x)

    @property
    def signature(self) -> tuple:
        """Units with equal signatures can swap positions."""
        raise NotImplementedError


class UnitNet(nn.Module):
    """Stem -> units (-> transitions) -> head, with the surgery above. Subclasses build
    their modules, then call `_set_units`, and define `forward_stem` / `forward_head`."""

    spec: object
    # What a user might try to remove that is not a unit (said with an unknown name).
    not_removable = "the stem and the head are not residual and cannot be removed"

    def _set_units(self, units: Sequence[nn.Module], names: Sequence[str], transitions: dict[int, nn.Module]) -> None:
        # Plain tuples, not ModuleLists: the units are already registered under their
        # torchvision names, and a second registration would duplicate state-dict keys.
        self._blocks: tuple[nn.Module, ...] = tuple(units)
        self._names: tuple[str, ...] = tuple(names)
        self._order: tuple[int, ...] = tuple(range(len(units)))
        self._transitions: dict[int, nn.Module] = dict(transitions)

    # -- units and names -----------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        """Stable names of the removable units, in the original forward order."""
        return list(self._names)

    @property
    def downsample_blocks(self) -> list[str]:
        """Units whose output shape differs from their input shape."""
        return [n for n, b in zip(self._names, self._blocks) if b.signature[0] != b.signature[1] or b.signature[2] != 1]

    def get_block(self, name: str) -> nn.Module:
        return self._blocks[self._index(name)]

    def _index(self, name: str) -> int:
        try:
            return self._names.index(name)
        except ValueError:
            raise KeyError(
                f"unknown block name {name!r}; this {self.spec.name} has blocks "
                f"{self._names[0]} ... {self._names[-1]} (see model.block_names)"
            ) from None

    def expand_names(self, names: Iterable[str]) -> list[str]:
        """Unit names; a family may accept a group name for several units (a ViT layer)."""
        return list(names)

    @property
    def blocks(self) -> list[nn.Module]:
        """Units in the current (possibly reordered) forward order."""
        return [self._blocks[i] for i in self._order]

    # -- forward pieces -------------------------------------------------------
    def forward_stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def pool(self, h: Tensor) -> Tensor:
        """A representation between units as one vector per image: (B, C, H, W) -> (B, C),
        the global average (what the head pools)."""
        return h.mean((2, 3))

    def _active_units(self) -> set[int] | None:
        """Units whose branch runs in this training batch (None: all)."""
        return None

    def forward_blocks(self, h: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Run unit positions [start, stop) of the current order on h (with the
        transitions that follow those positions)."""
        active = self._active_units()
        stop = len(self._order) if stop is None else stop
        for pos in range(start, stop):
            i = self._order[pos]
            blk = self._blocks[i]
            h = self.after(pos, blk(h) if active is None or i in active or blk.removed else blk.lesioned(h))
        return h

    def after(self, position: int, h: Tensor) -> Tensor:
        """h after the transition that follows unit position `position` (h itself if none):
        what a study walking the units one by one applies between them."""
        t = self._transitions.get(position)
        return h if t is None else t(h)

    def forward_until(self, x: Tensor, position: int) -> Tensor:
        """The input of the unit at `position` (0 = right after the stem)."""
        return self.forward_blocks(self.forward_stem(x), 0, position)

    def forward_from(self, h: Tensor, position: int) -> Tensor:
        """Logits, given `h` = the input of the unit at `position`."""
        return self.forward_head(self.forward_blocks(h, position))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_blocks(self.forward_stem(x)))

    # -- surgery --------------------------------------------------------------
    @contextlib.contextmanager
    def remove_blocks(self, names: Iterable[str]) -> Iterator[UnitNet]:
        """Within the context, the named units skip their residual branch; the previous
        state is restored on exit, also after an exception."""
        idx = [self._index(n) for n in self.expand_names(names)]
        saved = [b.removed for b in self._blocks]
        try:
            for i in idx:
                self._blocks[i].removed = True
            yield self
        finally:
            for b, r in zip(self._blocks, saved):
                b.removed = r

    @contextlib.contextmanager
    def reorder_blocks(self, order: Sequence[str]) -> Iterator[UnitNet]:
        """Within the context, run the units in `order` (a permutation of `block_names`).
        Position p may hold only a unit with the same signature as the original unit at p."""
        order = list(order)
        if sorted(order) != sorted(self._names):
            raise ValueError(
                f"order must be a permutation of model.block_names ({len(self._names)} blocks); "
                f"got {len(order)} names, unknown: {sorted(set(order) - set(self._names))}"
            )
        new = tuple(self._index(n) for n in order)
        for pos, i in enumerate(new):
            if self._blocks[i].signature != self._blocks[pos].signature:
                raise ValueError(
                    f"block {self._names[i]} (signature {self._blocks[i].signature}) cannot run at "
                    f"position {pos}, which needs {self._blocks[pos].signature}; see model.swappable_groups()"
                )
        saved = self._order
        try:
            self._order = new
            yield self
        finally:
            self._order = saved

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names by the group of units that owns them (the unit name before its last
        dot: a ResNet's or ConvNeXt's stage, a ViT's layer), and "other": the stem, the
        transitions between stages (ConvNeXt's downsampling layers) and the head."""
        owner: dict[int, str] = {}
        for name, blk in zip(self._names, self._blocks):
            for p in blk.parameters():
                owner.setdefault(id(p), name.rsplit(".", 1)[0])
        groups: dict[str, list[str]] = {}
        for n, p in self.named_parameters():
            groups.setdefault(owner.get(id(p), "other"), []).append(n)
        return groups

    def swappable_groups(self) -> list[list[str]]:
        """Groups of unit names that may be permuted among themselves."""
        groups: dict[tuple, list[str]] = {}
        for n, b in zip(self._names, self._blocks):
            groups.setdefault(b.signature, []).append(n)
        return [g for g in groups.values() if len(g) > 1]

    def batchnorms_after(self, position: int) -> list[nn.Module]:
        """The BNs whose inputs change when the unit at `position` (current order) changes."""
        after = [*self.blocks[position:], *(t for p, t in self._transitions.items() if p >= position)]
        return [m for blk in after for m in blk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def unit_io(self, x: Tensor) -> Iterator[tuple[str, Tensor, Tensor]]:
        """(name, skip, output) of each unit in forward order, from one forward pass: skip is
        what the unit's shortcut carries of its input (the input itself, or a ResNet's
        reshaped input where the shape changes), output what the unit passes on."""
        h = self.forward_stem(x)
        for pos, (name, blk) in enumerate(zip(self._names, self._blocks)):
            out = blk(h)
            yield name, blk.shortcut(h), out
            h = self.after(pos, out)

    @torch.no_grad()
    def response_stds(self, x: Tensor) -> dict[str, float]:
        """Std over all elements of each unit's residual branch f(x) on the batch x: what
        each update adds to the stream (He et al. Fig. 7's question for any family)."""
        h, stds = self.forward_stem(x), {}
        for pos, (name, blk) in enumerate(zip(self._names, self._blocks)):
            b = blk.branch(h)
            stds[name] = b.float().std().item()
            h = self.after(pos, blk.merge(b, None if blk.plain else blk.shortcut(h)))
        return stds
