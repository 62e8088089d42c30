"""Test-time lesion studies (Veit et al. 2016) on trained resnet-lab checkpoints.

The engine orchestrates; the network does the surgery (`remove_blocks`,
`reorder_blocks`, `forward_until` / `forward_from`). Every study walks the blocks
once per data chunk, keeping only the current block input h_i (B, C, H, W):

    h_0 = stem(x);  h_{i+1} = block_i(h_i)
    remove block i      -> logits = forward_from(h_i, i) with block i removed
    remove a set S      -> logits = forward_from(h_min(S), min(S)) with S removed
    reorder, first moved position p -> forward_from(h_p, p) in the new order

so the unchanged prefix is computed once, not once per condition, and memory is
bounded by the chunk size, not the dataset. BN runs in eval mode with the trained
running statistics (Veit et al.); `recalibrate_bn` is a separate, labelled condition.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import ResNet


@dataclass
class Tally:
    """Running top-1 error and mean loss of one condition."""

    wrong: int = 0
    loss: float = 0.0
    n: int = 0

    def add(self, logits: Tensor, y: Tensor) -> None:
        self.wrong += int((logits.argmax(1) != y).sum())
        self.loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        self.n += len(y)

    @property
    def error(self) -> float:
        return 100.0 * self.wrong / max(self.n, 1)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.n, 1)


@dataclass
class Condition:
    """One network variant: blocks removed and/or a block order."""

    key: str
    removed: tuple[str, ...] = ()
    order: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict)


def first_changed(model: ResNet, cond: Condition) -> int:
    """Position of the first block whose computation differs from the intact net."""
    names = model.block_names
    for b in cond.removed:
        model.get_block(b)  # KeyError naming the valid blocks
    pos = [names.index(b) for b in cond.removed]
    if cond.order is not None:
        pos += [i for i, (a, b) in enumerate(zip(names, cond.order)) if a != b]
    return min(pos) if pos else len(names)


@torch.no_grad()
def condition_logits(model: ResNet, x: Tensor, conds: Sequence[Condition]) -> dict[str, Tensor]:
    """Logits of every condition on one chunk, sharing the unchanged prefix.

    Conditions are grouped by their first changed position p; walking the blocks
    once, each group runs only its suffix from the cached h_p.
    """
    by_pos: dict[int, list[Condition]] = {}
    for c in conds:
        by_pos.setdefault(first_changed(model, c), []).append(c)
    out: dict[str, Tensor] = {}
    h = model.forward_stem(x)
    n = len(model.block_names)
    for p in range(n + 1):
        for c in by_pos.get(p, []):
            with model.remove_blocks(c.removed):
                if c.order is None:
                    out[c.key] = model.forward_from(h, p)
                else:
                    with model.reorder_blocks(c.order):
                        out[c.key] = model.forward_from(h, p)
        if p < n:
            h = model.forward_blocks(h, p, p + 1)
    return out


def evaluate(
    model: ResNet,
    batches: Iterable[tuple[Tensor, Tensor]],
    conds: Sequence[Condition],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Tally]:
    """Error and loss of each condition over the batches (prefix-shared)."""
    tallies = {c.key: Tally() for c in conds}
    for x, y in batches:
        for key, logits in condition_logits(model, x, conds).items():
            tallies[key].add(logits, y)
        if progress:
            progress(len(y))
    return tallies


@torch.no_grad()
def representations(model: ResNet, x: Tensor) -> Iterator[tuple[str, Tensor]]:
    """("stem", h_0), then (block name, its output) for each block in forward order: the
    points `forward_blocks` passes between blocks, from one forward pass."""
    h = model.forward_stem(x)
    yield "stem", h
    for i, name in enumerate(model.block_names):
        h = model.forward_blocks(h, i, i + 1)
        yield name, h


# -- the studies ----------------------------------------------------------------


def single_block_conditions(model: ResNet, blocks: Sequence[str] | None = None) -> list[Condition]:
    """The intact net, then each of `blocks` (default: all) removed alone."""
    down = set(model.downsample_blocks)
    names = model.block_names
    conds = [Condition("intact", meta={"block": "none", "position": -1, "downsample": False, "removed_as": "-"})]
    conds += [
        Condition(
            f"drop:{b}",
            removed=(b,),
            meta={
                "block": b,
                "position": names.index(b),
                "downsample": b in down,
                "removed_as": model.get_block(b).removed_as,
            },
        )
        for b in (blocks or names)
    ]
    return conds


def k_subsets(blocks: Sequence[str], k: int, samples: int, seed: int) -> list[tuple[str, ...]]:
    """`samples` distinct random k-subsets (all of them when there are fewer),
    reproducible from (seed, k) alone and independent of other k."""
    if not 1 <= k <= len(blocks):
        raise ValueError(f"k={k} must be between 1 and the {len(blocks)} removable blocks")
    rng = random.Random(f"{seed}:{k}")
    total = math.comb(len(blocks), k)
    if total <= samples:
        return [tuple(s) for s in itertools.combinations(blocks, k)]
    seen: dict[tuple[str, ...], None] = {}
    while len(seen) < samples:
        idx = sorted(rng.sample(range(len(blocks)), k))
        seen.setdefault(tuple(blocks[i] for i in idx), None)
    return list(seen)


def k_conditions(
    model: ResNet, k: int, samples: int, seed: int, blocks: Sequence[str] | None = None
) -> list[Condition]:
    blocks = list(blocks or model.block_names)
    return [
        Condition(f"k{k}:s{i}", removed=s, meta={"k": k, "sample": i, "removed": "+".join(s)})
        for i, s in enumerate(k_subsets(blocks, k, samples, seed))
    ]


def kendall_tau(order: Sequence[str], reference: Sequence[str]) -> float:
    """Kendall rank correlation of `order` against `reference` (1 = same order,
    -1 = reversed): 1 - 2 * discordant pairs / all pairs."""
    pos = {b: i for i, b in enumerate(order)}
    ranks = [pos[b] for b in reference]
    n = len(ranks)
    pairs = n * (n - 1) // 2
    discordant = sum(1 for i in range(n) for j in range(i + 1, n) if ranks[i] > ranks[j])
    return 1.0 - 2.0 * discordant / pairs if pairs else 1.0


def random_reorder(model: ResNet, swaps: int, rng: random.Random) -> tuple[str, ...]:
    """Apply `swaps` random swaps of shape-compatible blocks (Veit et al. Sec. 4.3)."""
    groups = model.swappable_groups()
    if not groups:
        raise ValueError(f"{model.spec.name} has no shape-compatible blocks to reorder")
    order = list(model.block_names)
    weights = [len(g) * (len(g) - 1) for g in groups]
    for _ in range(swaps):
        g = rng.choices(groups, weights=weights)[0]
        a, b = rng.sample(g, 2)
        ia, ib = order.index(a), order.index(b)
        order[ia], order[ib] = order[ib], order[ia]
    return tuple(order)


def reorder_conditions(model: ResNet, swaps: int, samples: int, seed: int) -> list[Condition]:
    rng = random.Random(f"{seed}:swaps{swaps}")
    conds = []
    for i in range(samples):
        order = random_reorder(model, swaps, rng)
        tau = kendall_tau(order, model.block_names)
        conds.append(Condition(f"swaps{swaps}:s{i}", order=order, meta={"swaps": swaps, "sample": i, "tau": tau}))
    return conds


@torch.no_grad()
def response_stds(model: ResNet, batches: Iterable[tuple[Tensor, Tensor]], max_batches: int = 4) -> dict[str, float]:
    """Mean over batches of the std of each 3x3 layer's response (He et al. Fig. 7)."""
    acc: dict[str, list[float]] = {}
    for x, _ in itertools.islice(batches, max_batches):
        for k, v in model.response_stds(x).items():
            acc.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}


@torch.no_grad()
def recalibrate_bn(model: ResNet, batches: Iterable[tuple[Tensor, Tensor]], from_position: int | None = 0) -> None:
    """Re-estimate BN running statistics on (unaugmented) training batches for the
    BNs at or after block `from_position` (earlier ones see unchanged inputs), and a
    pre-activation net's final BN; `from_position=None`: every BN, the stem's too (all
    weights changed). Cumulative averages (momentum=None); the model is left in eval mode."""
    if from_position is None:
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    else:
        bns = model.batchnorms_after(from_position)
    saved = [(bn.momentum, bn.training) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for bn, (mom, _tr) in zip(bns, saved):
            bn.momentum = mom
        model.eval()


def _conv_bn_nodes(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(conv node, BN node) of a traced net: each eval-mode BatchNorm (with running statistics)
    whose input is a convolution's output and that output's only use."""
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        conv_node = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module"):
            continue
        conv, bn = modules.get(conv_node.target), modules[node.target]
        if (isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and not bn.training
                and isinstance(conv, torch.nn.modules.conv._ConvNd) and len(conv_node.users) == 1):  # fmt: skip
            found.append((conv_node, node))
    return found


def _trace(model: torch.nn.Module) -> torch.fx.GraphModule | None:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - control flow on values (the ViTs): no pairs
        return None


def conv_bn_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names of `model` where the BN (eval mode) directly follows
    the convolution as its only user: the pairs a fold may merge; none in a net torch.fx cannot trace."""
    gm = _trace(model)
    return [(c.target, b.target) for c, b in _conv_bn_nodes(gm)] if gm is not None else []


def fold_bn(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[], None]]:
    """`(net, refold)`: `model` (eval mode) as it evaluates, each BatchNorm that directly follows
    a convolution (as that convolution's only user) folded into a copy of it: conv(x, W s) +
    beta + (c - mean) s, s = gamma / sqrt(var + eps), c the conv's bias or 0. The same function,
    one pass over every activation fewer (12% off a landscape point of ResNet-56 on CPU,
    BENCHMARKS.md). `net` shares every other module with `model`; `refold()` recomputes the
    folded weights from `model`'s convolutions and BN parameters and statistics: call it whenever
    they changed. A net without such pairs (a BN in training mode normalises by its batch: it is
    never folded), or one torch.fx cannot trace (control flow on values: the ViTs), comes back
    as itself."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    gm = _trace(model)
    found = _conv_bn_nodes(gm) if gm is not None else []
    if not found:
        return model, lambda: None
    pairs = []
    for conv_node, node in found:
        conv, bn = gm.get_submodule(conv_node.target), gm.get_submodule(node.target)
        folded = copy.deepcopy(conv).requires_grad_(False)
        folded.bias = torch.nn.Parameter(conv.weight.new_zeros(conv.out_channels), requires_grad=False)
        conv_node.target = f"folded_{len(pairs)}"
        gm.add_submodule(conv_node.target, folded)
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        pairs.append((conv, bn, folded))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()

    @torch.no_grad()
    def refold() -> None:
        for conv, bn, folded in pairs:
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)  # fmt: skip
            folded.weight.copy_(w)
            folded.bias.copy_(b)

    refold()
    return gm.eval(), refold
