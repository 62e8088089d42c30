"""Veit et al. 2016, Sec. 5 / Fig. 6: which path lengths carry the gradient.

A residual net of n blocks is a sum over 2^n paths: each block contributes either its
residual branch or its skip. Unrolled, the input gradient is the chain-rule product

    dL/dh_0 = prod_i (J_skip,i + J_branch,i)^T  dL/dh_n        (J taken at the forward point)

and expanding the product gives one term per subset S of blocks: the gradient routed
through the branches of S and the skips of the rest. Veit et al. measure, for each path
length k = |S|, the norm of such routed gradients at the input of the first block:

  (a) path lengths are Binomial(n, 1/2): C(n, k) / 2^n of all paths have length k;
  (b) the routed gradient magnitude falls roughly exponentially with k;
  (c) (a) x (b) is the total gradient per length: it is carried by short paths.

The forward pass is the same for every routing, so `routed_input_grads` runs it once
per batch and keeps each block's vector-Jacobian products (branch, skip and the merge,
of the block's own `branch` / `shortcut` / `merge`, kept as autograd graphs); each routing
is then a chain of VJPs, and routings that agree on their last blocks share that part of
the chain. The network is never re-implemented here: forward values are the model's own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..models import ResNet
from .stats import Running


class PathsError(UserError, ValueError):
    """The paths study cannot run on this network."""


def check_applicable(model: ResNet) -> None:
    if model.spec.plain:
        raise PathsError(
            f"the paths study needs skip connections; {model.spec.name} is a plain net (one path: "
            "every block's branch). Run it on a residual checkpoint"
        )


@dataclass
class _BlockVJP:
    merge: object  # g_out -> (g_branch, g_skip)
    branch: object  # g -> (g_in,)
    skip: object | None  # g -> (g_in,); None = identity skip


def routed_input_grads(model: ResNet, x: Tensor, y: Tensor, routes: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of the intact net, and the routed input gradients of the summed loss.

    x: (B, 3, H, W) images, y: (B,) labels, routes: (R, n) bool over the blocks in
    forward order, True = the gradient passes that block through its residual branch,
    False = through its skip. Returns (logits (B, classes), grads (R, B, C, H, W)),
    grads[r] being d(sum of the cross-entropy losses)/d h_0 along routing r, h_0 the
    input of the first block. Eval mode (BN running statistics) makes every image's
    gradient its own loss's. The routings never change the forward pass."""
    grads = [None] * len(routes)

    def keep(r: int, g: Tensor) -> None:
        grads[r] = g

    logits = _routed(model, x, y, routes, keep)
    return logits, torch.stack(grads)


def routed_input_grad_norms(model: ResNet, x: Tensor, y: Tensor, routes: Tensor) -> Tensor:
    """(R, B): ||routed input gradient|| per routing and image (memory: no (R, B, C, H, W))."""
    norms = torch.empty(len(routes), len(y), dtype=torch.float64, device="cpu")  # host-side, wherever g is

    def norm(r: int, g: Tensor) -> None:
        norms[r] = g.flatten(1).double().norm(dim=1)

    _routed(model, x, y, routes, norm)
    return norms


def _routed(model: ResNet, x: Tensor, y: Tensor, routes: Tensor, emit) -> Tensor:
    """One forward pass keeping every block's VJPs, then each routing's chain of VJPs.

    Routings that agree on their last blocks share that part of the backward pass: a
    depth-first walk over the routings' choices from the top block down computes each
    distinct partial gradient once, holding one (B, C, H, W) tensor per level."""
    check_applicable(model)
    blocks = model.blocks
    if routes.ndim != 2 or routes.shape[1] != len(blocks):
        raise PathsError(f"routes must be (R, {len(blocks)}) for {model.spec.name}, got {tuple(routes.shape)}")
    if model.training:
        raise PathsError("the paths study runs in eval mode (model.eval()): BN must use its running statistics")
    with torch.enable_grad():
        h = model.forward_stem(x).detach()
        vjps = []
        for pos, blk in enumerate(blocks):
            h_in = h.detach().requires_grad_()
            b = blk.branch(h_in)
            s = h_in if blk.downsample is None else blk.shortcut(h_in)
            b_leaf, s_leaf = b.detach().requires_grad_(), s.detach().requires_grad_()
            # A transition after the block (a ConvNeXt's downsampling layer) acts on the sum
            # of both paths: it is part of the merge's VJP, common to every routing.
            h = model.after(pos, blk.merge(b_leaf, s_leaf))
            vjps.append(_BlockVJP(_vjp(h, (b_leaf, s_leaf)), _vjp(b, (h_in,)), None if s is h_in else _vjp(s, (h_in,))))
        h_top = h.detach().requires_grad_()
        logits = model.forward_head(h_top)
        # d(sum_i CE(logits_i, y_i)) / d logits = softmax - onehot
        g_logits = logits.detach().softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
        (g_top,) = torch.autograd.grad(logits, h_top, g_logits)
    # Plain autograd graphs (no torch.func closures, which form reference cycles that keep
    # the saved activations alive until the garbage collector runs), freed on return; the
    # backward records no graph of its own, so the walk holds one tensor per level.
    with torch.no_grad():
        _walk(vjps, routes.tolist(), emit, len(vjps) - 1, g_top, list(range(len(routes))))
    return logits.detach()


def _vjp(out: Tensor, inputs: tuple[Tensor, ...]):
    """g -> d(out)/d(inputs)^T g, reusable (the graph is retained)."""
    return lambda g: torch.autograd.grad(out, inputs, g, retain_graph=True)


def _walk(vjps: list[_BlockVJP], choice: list[list[bool]], emit, level: int, g: Tensor, members: list[int]) -> None:
    """Depth-first over the routings' choices, from block `level` down: g is the gradient
    at that block's output, shared by `members`. A module-level function, not a closure
    calling itself: that would be a reference cycle keeping every block's saved
    activations alive until the cyclic garbage collector happens to run."""
    if level < 0:
        for r in members:
            emit(r, g)
        return
    v = vjps[level]
    g_branch, g_skip = v.merge(g)
    via_branch = [r for r in members if choice[r][level]]
    via_skip = [r for r in members if not choice[r][level]]
    if via_branch:
        _walk(vjps, choice, emit, level - 1, v.branch(g_branch)[0], via_branch)
    if via_skip:
        _walk(vjps, choice, emit, level - 1, g_skip if v.skip is None else v.skip(g_skip)[0], via_skip)


def path_length_pmf(n: int) -> list[float]:
    """(a): the fraction of the 2^n paths with k branches, k = 0..n."""
    return [math.comb(n, k) / 2.0**n for k in range(n + 1)]


def sample_routes(n: int, k: int, samples: int, rng: random.Random) -> Tensor:
    """`samples` random routings with exactly k branches: (samples, n) bool."""
    routes = torch.zeros(samples, n, dtype=torch.bool, device="cpu")  # a plan, read as lists
    for r in range(samples):
        routes[r, rng.sample(range(n), k)] = True
    return routes


def gradient_by_length(
    model: ResNet,
    batches: Iterable[tuple[Tensor, Tensor]],
    lengths: Sequence[int],
    samples: int,
    seed: int,
    progress=None,
    max_batch: int = 128,
) -> dict[int, Running]:
    """(b): ||dL/dh_0|| along `samples` random routings of each length k, per image
    and batch (fresh routings per batch, reproducible from seed, k and batch index).
    Batches are cut to `max_batch` images, so memory stays near a training step's."""
    n = len(model.block_names)
    stats = {k: Running() for k in lengths}
    cut = ((x[i : i + max_batch], y[i : i + max_batch]) for x, y in batches for i in range(0, len(y), max_batch))
    for bi, (x, y) in enumerate(cut):
        routes = torch.cat([sample_routes(n, k, samples, random.Random(f"{seed}:{k}:{bi}")) for k in lengths])
        norms = routed_input_grad_norms(model, x, y, routes)  # (R, B): one measurement per routing and image
        for j, k in enumerate(lengths):
            stats[k].add(norms[j * samples : (j + 1) * samples])
        if progress:
            progress(len(y))
    return stats


def total_gradient(pmf: Sequence[float], grad_mean: Sequence[float]) -> list[float]:
    """(c): the share of the total gradient magnitude carried by each length,
    pmf(k) * mean routed norm(k), normalised to sum to 1."""
    mass = [p * g for p, g in zip(pmf, grad_mean)]
    s = sum(mass)
    return [m / s for m in mass] if s > 0 else [0.0] * len(mass)


def effective_range(share: Sequence[float], level: float = 0.9) -> tuple[int, int, float]:
    """The shortest window [lo, hi] of path lengths holding at least `level` of the
    total gradient (ties: the window holding more); returns (lo, hi, its share)."""
    best: tuple[int, float, int, int] | None = None  # (width, -mass, lo, hi)
    prefix = [0.0]
    for v in share:
        prefix.append(prefix[-1] + v)
    for lo in range(len(share)):
        for hi in range(lo, len(share)):
            mass = prefix[hi + 1] - prefix[lo]
            if mass >= level - 1e-12:
                cand = (hi - lo, -mass, lo, hi)
                if best is None or cand < best:
                    best = cand
                break
    if best is None:
        raise PathsError("no gradient reached the input along any sampled path")
    return best[2], best[3], -best[1]


def length_rows(model: ResNet, stats: dict[int, Running], images: int) -> list[dict]:
    """One row per measured length: (a) path_fraction, (b) grad_mean/std over grad_n
    measurements (routings x images)."""
    n = len(model.block_names)
    pmf = path_length_pmf(n)
    return [
        {
            "key": f"k={k}",
            "k": k,
            "n_blocks": n,
            "path_fraction": pmf[k],
            "grad_mean": s.mean,
            "grad_std": s.std,
            "grad_n": s.n,
            "images": images,
        }
        for k, s in sorted(stats.items())
    ]


def with_shares(rows: list[dict], level: float = 0.9) -> list[dict]:
    """Complete one checkpoint's length rows (all k = 0..n): each gets (c) total_share,
    and an 'effective range' row is appended: the shortest window of lengths holding
    at least `level` of the total gradient, and the fraction of all paths inside it."""
    rows = sorted(rows, key=lambda r: r["k"])
    n = rows[0]["n_blocks"]
    if [r["k"] for r in rows] != list(range(n + 1)):
        raise PathsError(f"path-length rows cover k={[r['k'] for r in rows]}, expected 0..{n}")
    share = total_gradient([r["path_fraction"] for r in rows], [r["grad_mean"] for r in rows])
    out = [{**r, "total_share": s} for r, s in zip(rows, share)]
    lo, hi, mass = effective_range(share, level)
    base = {k: v for k, v in rows[0].items() if k not in ("key", "k", "path_fraction", "grad_mean", "grad_std")}
    out.append(
        {
            **base,
            "key": "effective range",
            "range_lo": lo,
            "range_hi": hi,
            "range_level": level,
            "range_gradient_share": mass,
            "range_path_share": sum(r["path_fraction"] for r in rows[lo : hi + 1]),
        }
    )
    return out


def path_study(
    model: ResNet, batches: Iterable[tuple[Tensor, Tensor]], samples: int = 10, seed: int = 0, level: float = 0.9
) -> list[dict]:
    """The whole study on one model, as rows: k = 0..n, then the effective range.

    `batches` is consumed once, so pass a list to reuse it."""
    batches = list(batches)
    stats = gradient_by_length(model, batches, range(len(model.block_names) + 1), samples, seed)
    return with_shares(length_rows(model, stats, sum(len(y) for _, y in batches)), level)
