"""`hessian`: curvature of the training loss at the trained weights (PyHessian, Yao et al.
2020; Ghorbani et al. 2019), with and without residual connections.

Hessian-vector products Hv of the checkpoint's training loss (ctx.loss, the mean over the
study's images: a seeded sample of training images, or with --limit the evaluation split's
first images), BN in eval mode, computed exactly by double backward on a private copy of the
network whose convolutions take their double backward on PyTorch's own forward and backward
kernels, each with the BN that follows it folded in, differentiably (`for_products`). From them:
  - the top-k eigenvalues by Lanczos with full re-orthogonalisation, stopped when every one
    of the k Ritz pairs has a residual ||H y - theta y|| = |beta_m s_m| at most
    --hessian-tol x |theta| (an a-posteriori bound, not a change between iterations);
  - the trace by Hutchinson's estimator with Rademacher vectors: the mean of z^T H z and its
    95% t interval, with as many samples as a pilot of MIN_SAMPLES says a half-width of
    --hessian-tol x |mean| needs (Stein's two stages; at most --hessian-max-iter); its
    independent products are taken in blocks of up to 8 vectors that share each chunk's
    forward pass and first backward;
  - on request (--hessian-slq N) the spectral density by stochastic Lanczos quadrature:
    N Lanczos runs from Rademacher starts; nodes are the Ritz values, weights the squared
    first components of their eigenvectors (each run's weights sum to 1).
With --hessian-per-stage on, the same for each stage's parameters alone (the diagonal
block of H; the model's `parameter_groups`: a ResNet's or ConvNeXt's stages, a ViT's layers,
and "other": the stem, ConvNeXt's downsampling layers, the head and any final BN), whose
traces sum to the trace.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..stats import differences_table, net_differences
from ..study import AblationError, Measure, Section, Study, option, save_figure

NAME = "hessian"
EIGEN = Measure("Hessian eigenvalue", 3)
TRACE = Measure("Hessian trace", 2)
RATIO = Measure("top eigenvalue / trace", 4)
MIN_SAMPLES = 30  # Hutchinson pilot samples (the spread of a quadratic form is poorly seen in fewer)
CHUNK = 64  # images per double backward at most: memory holds one chunk's graph (ResNet-110: 2 GB at 250)
GRAPH_BYTES = 2**29  # ... and that graph at most 512 MiB (ResNet-110: 8.0 MiB an image, 63; BENCHMARKS.md)
DENSITY_POINTS = 200
KEEP_BYTES = 2**30  # every chunk's graph kept from product to product when together at most 1 GiB
BLOCK, BLOCK_BYTES = 8, 2**28  # Hutchinson's products in blocks of <= 8 vectors, <= 256 MiB of them


@dataclass(frozen=True)
class Options:
    hessian_images: int = option(1000, "hessian: images the loss is taken over (a seeded training sample)")
    hessian_top_k: int = option(1, "hessian: top eigenvalues by Lanczos")
    hessian_tol: float = option(1e-3, "hessian: relative accuracy of the eigenvalues and the trace", "float>0")
    hessian_max_iter: int = option(100, "hessian: Lanczos steps and Hutchinson samples at most")
    hessian_slq: int | None = option(None, "hessian: also the spectral density from N SLQ runs", "count?", metavar="N")
    hessian_per_stage: str = option("off", "hessian: also each stage's parameters alone", "choice", ("off", "on"))


# -- Hessian-vector products ----------------------------------------------------------------
def make_hvp(model, loss: Callable, data: list[tuple[Tensor, Tensor]], names: list[str],
             chunk: int | None = None) -> Callable[[Tensor], Tensor]:  # fmt: skip
    """V -> H V of the mean loss over `data`, H restricted to `names`; V is one flat vector over
    `names` or a block of them as columns (dim x m). Images go `chunk` at a time (by default as
    many as `chunk_size` allows for the graph of these weights). Each chunk's forward pass and
    first backward (its graph) serve every vector of a block, and, when the graphs of all chunks
    together take at most KEEP_BYTES, every later product too: the first call builds and keeps
    them. Then a product costs its double backward alone. V and H V are float64 on the CPU,
    wherever the model and `data` are."""
    params = dict(model.named_parameters())
    ps = [params[n] for n in names]
    sizes = [p.numel() for p in ps]
    n_images = sum(len(y) for _, y in data)
    per_image = image_bytes(model, loss, *data[0], ps)
    step = chunk or chunk_size(per_image)
    keep = n_images * per_image <= KEEP_BYTES
    kept: list[tuple[Tensor, ...]] = []  # each chunk's gradient, with its graph

    def graphs():
        for x, y in data:
            for i in range(0, len(y), step):
                value = loss(model(x[i : i + step]), y[i : i + step], reduction="sum") / n_images
                yield torch.autograd.grad(value, ps, create_graph=True)

    def hvp(v: Tensor) -> Tensor:
        block = v.reshape(len(v), -1)
        cols = [col.to(ps[0].device, ps[0].dtype).contiguous() for col in block.T]  # CPU float64 -> the weights'
        vs = [[u.view_as(p) for u, p in zip(torch.split(col, sizes), ps)] for col in cols]
        out = torch.zeros(block.shape, dtype=torch.float64, device="cpu")
        built = []
        # Attention (ViT) through the math kernel: the fused ones have no double backward.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            for g in kept or graphs():
                for k, u in enumerate(vs):
                    hv = torch.autograd.grad(g, ps, grad_outputs=u, retain_graph=keep or k < len(vs) - 1)
                    out[:, k] += torch.cat([h.reshape(-1) for h in hv]).double().cpu()
                if keep and not kept:
                    built.append(g)
        kept.extend(built)  # only after a whole pass: an interrupted first call keeps nothing
        return out.reshape(v.shape)

    hvp.chunk = step  # type: ignore[attr-defined]
    hvp.dim = sum(sizes)  # type: ignore[attr-defined]
    hvp.keeps = keep  # type: ignore[attr-defined]
    return hvp


class AffineBatchNorm(nn.Module):
    """An eval-mode BatchNorm as the per-channel affine map it computes, x w / sqrt(var + eps) +
    b - mean w / sqrt(var + eps), on the same Parameters under the same names: the same function
    and the same Hessian. Autograd's double backward through these few elementwise operations
    is cheap, where BatchNorm's own evaluates its training-mode formula, batch reductions and
    all: 7% off a product on CPU (BENCHMARKS.md). Running statistics whatever the mode: eval only."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(s, t) of the map x s + t, per channel, differentiable in the BN's parameters."""
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        return scale, shift if self.bias is None else shift + self.bias

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale, shift = self.scale_shift()
        return x * scale.view(shape) + shift.view(shape)


class FoldedBatchNorm(AffineBatchNorm):
    """An AffineBatchNorm folded into the ProductConv before it, which applies its map: the
    identity here, where its Parameters keep their names."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class _ConvGrads(torch.autograd.Function):
    """(g, x, w) -> (dL/dx, dL/dw) of a bias-free 2-d convolution whose output has gradient g:
    PyTorch's own kernel, with a backward that is made of native kernels too. PyTorch's own
    double backward takes the term <ggx, dL/dx> / dw as a convolution over batch-transposed
    tensors, slow on the CPU; here it is the weight gradient of conv(ggx, w) at g, the kernel
    every backward uses. (dx is None where x needs no gradient: the first convolution.)"""

    @staticmethod
    def forward(ctx, g: Tensor, x: Tensor, w: Tensor, args: tuple, need_x: bool):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(g, x, w)
        ctx.args = args
        dx, dw, _ = _conv_backward(g, x, w, args, [need_x, True, False])
        return dx, dw

    @staticmethod
    def backward(ctx, ggx: Tensor | None, ggw: Tensor | None):
        g, x, w = ctx.saved_tensors
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        dg = dx = dw = None
        if ggx is not None:  # dx = conv_transpose(g, w): linear in g and in w
            dg = F.conv2d(ggx, w, None, *ctx.args) if need_g else None
            dw = _conv_backward(g, ggx, w, ctx.args, [False, True, False])[1] if need_w else None
        if ggw is not None:  # dw = the correlation of x and g: linear in each
            if need_g:
                dg_w = F.conv2d(x, ggw, None, *ctx.args)
                dg = dg_w if dg is None else dg + dg_w
            dx = _conv_backward(g, x, ggw, ctx.args, [True, False, False])[0] if need_x else None
        return dg, dx, dw, None, None


def _conv_backward(g: Tensor, x: Tensor, w: Tensor, args: tuple, mask: list[bool]):
    stride, padding, dilation, groups = args
    return torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0], groups, mask)


class _Conv(torch.autograd.Function):
    """conv2d(x, w) (no bias) whose backward is _ConvGrads: differentiable again, natively."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, args: tuple) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.args = args
        return F.conv2d(x, w, None, *args)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        dx, dw = _ConvGrads.apply(g, x, w, ctx.args, ctx.needs_input_grad[0])
        return dx, dw, None


class ProductConv(nn.Module):
    """A zero-padded Conv2d on the same Parameters under the same names, the same function, whose
    double backward runs on PyTorch's forward and backward convolution kernels (_ConvGrads).
    With `bn`, the FoldedBatchNorm that follows it, it computes conv(x, W s) + (c s + t), the BN's
    map x s + t folded into the weights differentiably: weight-sized multiplications where
    the BN took activation-sized ones, forward, backward and double backward."""

    def __init__(self, conv: nn.Conv2d, bn: FoldedBatchNorm | None = None):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        self.bn = (bn,)  # not a submodule: its Parameters stay the BN's

    def forward(self, x: Tensor) -> Tensor:
        w, shift = self.weight, self.bias
        (bn,) = self.bn
        if bn is not None:
            scale, t = bn.scale_shift()
            w = w * scale.view(-1, 1, 1, 1)
            shift = t if shift is None else shift * scale + t
        out = _Conv.apply(x, w, self.args)
        return out if shift is None else out + shift.view(1, -1, 1, 1)


def affine_bns(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with every BatchNorm that has running statistics an AffineBatchNorm."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.running_var is not None:
                setattr(parent, name, AffineBatchNorm(child))
    return model


def for_products(model: nn.Module) -> nn.Module:
    """`model` (a private copy, eval mode: changed in place) ready for Hessian-vector products:
    every zero-padded Conv2d a ProductConv, each eval-mode BatchNorm that directly follows one
    folded into it (engine.conv_bn_pairs), every other BatchNorm with running statistics an
    AffineBatchNorm; channels-last. The same function of the same Parameters under the same
    names, so the same Hessian."""
    from ..engine import conv_bn_pairs

    model.eval()
    pairs = dict(conv_bn_pairs(model))  # conv name -> BN name
    for conv_name, bn_name in pairs.items():
        conv = model.get_submodule(conv_name)
        if _product_conv(conv):
            bn = FoldedBatchNorm(model.get_submodule(bn_name))
            model.set_submodule(bn_name, bn)
            model.set_submodule(conv_name, ProductConv(conv, bn))
    affine_bns(model)
    for name, m in list(model.named_modules()):
        if _product_conv(m):
            model.set_submodule(name, ProductConv(m))
    return model.to(memory_format=torch.channels_last)


def _product_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def graph_bytes(model, loss: Callable, x: Tensor, y: Tensor, ps: list[Tensor]) -> int:
    """Bytes of the tensors autograd saves for the loss over (x, y) and its gradient with respect
    to `ps` taken with create_graph: the graph a product keeps for its double backward. Each
    storage once (a view of the inputs or a weight counts as the storage it shares)."""
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.autograd.grad(loss(model(x), y, reduction="sum"), ps, create_graph=True)
    return sum(saved.values())


def image_bytes(model, loss: Callable, x: Tensor, y: Tensor, ps: list[Tensor]) -> int:
    """Bytes one more image adds to the graph a product keeps (two images' graph less one's: the
    inputs' and the weights' storages cancel); with one image only, that image's whole graph."""
    one = graph_bytes(model, loss, x[:1], y[:1], ps)
    return max(1, graph_bytes(model, loss, x[:2], y[:2], ps) - one if len(y) > 1 else one)


def chunk_size(per_image: int) -> int:
    """Images per chunk: CHUNK, or fewer where a chunk's graph (`per_image` bytes an image,
    image_bytes) would pass GRAPH_BYTES. Deep or wide nets and large images get smaller chunks."""
    return max(1, min(CHUNK, GRAPH_BYTES // per_image))


def block_size(dim: int) -> int:
    """Vectors per block of independent products (Hutchinson): up to BLOCK, and no more than
    BLOCK_BYTES of float64 (a ViT-B's 86M weights: one at a time)."""
    return max(1, min(BLOCK, BLOCK_BYTES // (8 * dim)))


# -- estimators ----------------------------------------------------------------------------
@dataclass
class Lanczos:
    ritz: list[float]  # the top-k Ritz values, descending
    residuals: list[float]  # their residual bounds |beta_m s_m|
    hvps: int
    nodes: list[float]  # every Ritz value of the last tridiagonal matrix (SLQ)
    weights: list[float]  # squared first components of their eigenvectors


def lanczos(matvec: Callable[[Tensor], Tensor], dim: int, k: int, iters: int, tol: float, start: Tensor,
            reorthogonalise: bool = True) -> Lanczos:  # fmt: skip
    """Lanczos from `start`; stops when the top k Ritz pairs have residual <= tol |theta|, the
    Krylov space is exhausted, or after `iters` products."""
    q = start.double() / start.double().norm()
    basis, alphas, betas = [q], [], []
    ritz = res = nodes = weights = None
    for j in range(min(iters, dim)):
        w = matvec(basis[j])
        a = float(w @ basis[j])
        w = w - a * basis[j] - (betas[-1] * basis[j - 1] if j else 0)
        if reorthogonalise:  # twice is enough (Parlett): Q Q^T w removed against every earlier q
            Q = torch.stack(basis)
            for _ in range(2):
                w = w - Q.T @ (Q @ w)
        alphas.append(a)
        b = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64, device="cpu"))
        if j:
            off = torch.tensor(betas, dtype=torch.float64, device="cpu")
            T += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        order = torch.argsort(evals, descending=True)
        ritz = evals[order][:k].tolist()
        res = (b * evecs[-1, order][:k]).abs().tolist()
        nodes, weights = evals.tolist(), (evecs[0] ** 2).tolist()
        if len(ritz) == k and all(r <= tol * abs(t) for r, t in zip(res, ritz)):
            return Lanczos(ritz, res, j + 1, nodes, weights)
        if b <= 1e-10 * max(1.0, max(abs(x) for x in nodes)):  # an invariant subspace: exact
            return Lanczos(ritz, [0.0] * len(ritz), j + 1, nodes, weights)
        betas.append(b)
        basis.append(w / b)
    return Lanczos(ritz, res, min(iters, dim), nodes, weights)


@dataclass
class Trace:
    mean: float
    lo: float
    hi: float
    samples: int
    converged: bool


def hutchinson(matvec: Callable[[Tensor], Tensor], dim: int, tol: float, max_samples: int,
               gen: torch.Generator, block: int = 1) -> Trace:  # fmt: skip
    """Mean of z^T H z over Rademacher z, with its 95% t interval, aiming at half-width <= tol |mean|.

    Two stages (Stein 1945): MIN_SAMPLES pilot samples estimate the spread and so the number of
    samples the tolerance needs; that many are drawn (at most `max_samples`), and the interval is
    the mean of all of them +- t(pilot - 1) s_pilot / sqrt(n), whose coverage does not depend
    on how n was chosen (for normal samples: exact). One look at the data: stopping whenever the running interval first
    looks narrow enough would favour runs whose spread happens to be underestimated, and its
    intervals would cover the trace less often than they claim. The products are taken `block`
    vectors at a time (the same draws, in the same order, whatever the block)."""
    from scipy.stats import t

    def draw(count: int) -> list[float]:
        values = []
        for start in range(0, count, block):
            Z = torch.stack([torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64, device="cpu") * 2 - 1
                             for _ in range(min(block, count - start))], 1)  # fmt: skip
            values += (Z * matvec(Z)).sum(0).tolist()
        return values

    pilot = min(MIN_SAMPLES, max(max_samples, 2))
    values = draw(pilot)
    m0, s0 = statistics.fmean(values), statistics.stdev(values)
    want = (float(t.ppf(0.975, pilot - 1)) * s0 / (tol * abs(m0))) ** 2 if m0 else math.inf
    n = max(pilot, min(max_samples, math.ceil(want))) if math.isfinite(want) else max(pilot, max_samples)
    values += draw(n - pilot)
    m = statistics.fmean(values)
    half = float(t.ppf(0.975, pilot - 1)) * s0 / math.sqrt(n)  # Stein: the pilot's spread, its t quantile
    return Trace(m, m - half, m + half, n, half <= tol * abs(m))


def density(runs: list[Lanczos], points: int = DENSITY_POINTS) -> tuple[list[float], list[float], float]:
    """SLQ: the runs' (node, weight) pairs averaged, smoothed by a Gaussian of width sigma on a
    grid spanning the nodes +- 5 sigma: (grid, density, sigma). The weights sum to 1."""
    nodes = torch.tensor([x for r in runs for x in r.nodes], dtype=torch.float64, device="cpu")
    weights = torch.tensor([w for r in runs for w in r.weights], dtype=torch.float64, device="cpu") / len(runs)
    span = float(nodes.max() - nodes.min()) or 1.0
    sigma = span / 100
    grid = torch.linspace(float(nodes.min()) - 5 * sigma, float(nodes.max()) + 5 * sigma, points, dtype=torch.float64,
                          device="cpu")  # fmt: skip
    dens = (weights[None] * torch.exp(-((grid[:, None] - nodes[None]) ** 2) / (2 * sigma**2))).sum(1)
    return grid.tolist(), (dens / (sigma * math.sqrt(2 * math.pi))).tolist(), sigma


def _name(model) -> str:
    return model.spec.name if hasattr(model, "spec") else type(model).__name__


# -- the study -------------------------------------------------------------------------------
class Hessian(Study):
    name = NAME
    Options = Options
    metrics = {
        "hessian_top": "top eigenvalue of the training loss's Hessian",
        "hessian_trace": "Hutchinson estimate of the Hessian's trace",
    }

    def check(self, specs, options, common) -> None:
        if options.hessian_tol >= 1:
            raise AblationError(f"--hessian-tol {options.hessian_tol:g} must be below 1: it is a relative accuracy "
                                "(1e-3 asks for 0.1%)")  # fmt: skip
        if options.hessian_top_k > options.hessian_max_iter:
            raise AblationError(
                f"--hessian-top-k {options.hessian_top_k} exceeds --hessian-max-iter {options.hessian_max_iter} "
                "(Lanczos finds at most one eigenvalue per step): raise --hessian-max-iter"
            )

    def check_model(self, model, options, common) -> None:
        n = sum(p.numel() for p in model.parameters())
        if options.hessian_top_k > n:
            raise AblationError(f"--hessian-top-k {options.hessian_top_k} exceeds the {n} weights of "
                                f"{_name(model)}: lower it")  # fmt: skip
        stages = [g for g in model.parameter_groups() if g != "other"]
        if options.hessian_per_stage == "on" and len(stages) < 2:
            raise AblationError(f"--hessian-per-stage on: {_name(model)} has no stages to separate "
                                f"(its units form one group, {stages}); use off")  # fmt: skip

    def run(self, ctx) -> None:
        o = ctx.options
        groups = {"all": [n for n, _ in ctx.model.named_parameters()]}
        if o.hessian_per_stage == "on":
            groups.update(ctx.model.parameter_groups())
        state: dict[str, Any] = {}

        def hvp_of(names: list[str]):
            if not state:  # once, and only if a unit is left
                x, y, what = ctx.images(o.hessian_images)
                model = for_products(ctx.scratch())  # private: the shared model keeps its modules
                x = x.contiguous(memory_format=torch.channels_last)  # as the copy's weights
                state.update(model=model, data=[(x, y)], what=what, n=len(y))
            return make_hvp(state["model"], ctx.loss, state["data"], names), state  # chunks sized by its graph

        for group, names in groups.items():
            for rows in ctx.unit(f"{group} eigenvalues"):
                hvp, s = hvp_of(names)
                start = torch.randn(
                    hvp.dim, generator=torch.Generator().manual_seed(ctx.common.seed), dtype=torch.float64, device="cpu"
                )
                lz = lanczos(hvp, hvp.dim, o.hessian_top_k, o.hessian_max_iter, o.hessian_tol, start)
                for i, (v, r) in enumerate(zip(lz.ritz, lz.residuals), 1):
                    rows.append(ctx.row(key=f"{group} top{i}", group=group, quantity="eigenvalue", rank=i, value=v,
                                        residual=r, converged=r <= o.hessian_tol * abs(v), hvps=lz.hvps,
                                        weights=hvp.dim, images=s["n"], sample=s["what"]))  # fmt: skip
            for rows in ctx.unit(f"{group} trace"):
                hvp, s = hvp_of(names)
                tr = hutchinson(hvp, hvp.dim, o.hessian_tol, o.hessian_max_iter,
                                torch.Generator().manual_seed(ctx.common.seed + 1), block_size(hvp.dim))  # fmt: skip
                rows.append(ctx.row(key=f"{group} trace", group=group, quantity="trace", value=tr.mean, ci_lo=tr.lo,
                                    ci_hi=tr.hi, samples=tr.samples, converged=tr.converged, hvps=tr.samples,
                                    weights=hvp.dim, images=s["n"], sample=s["what"]))  # fmt: skip
            if o.hessian_slq and group == "all":
                for rows in ctx.unit("all density"):
                    hvp, s = hvp_of(names)
                    gen = torch.Generator().manual_seed(ctx.common.seed + 2)
                    runs = []
                    for _ in range(o.hessian_slq):
                        z = torch.randint(0, 2, (hvp.dim,), generator=gen, dtype=torch.float64, device="cpu") * 2 - 1
                        runs.append(lanczos(hvp, hvp.dim, 1, min(o.hessian_max_iter, 80), 0.0, z))
                    grid, dens, sigma = density(runs)
                    rows.append(ctx.row(key="all density", group="all", quantity="density", grid=grid, density=dens,
                                        sigma=sigma, runs=len(runs), hvps=sum(r.hvps for r in runs),
                                        images=s["n"], sample=s["what"]))  # fmt: skip

    # -- summaries ---------------------------------------------------------------------------
    def per_checkpoint(self, rows: list[dict]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in self.mine(rows):
            q = out.setdefault(r["checkpoint"], {})
            if r["quantity"] == "eigenvalue" and r["rank"] == 1:
                q[f"{r['group']} top eigenvalue"] = r["value"]
            elif r["quantity"] == "trace":
                q[f"{r['group']} trace"] = r["value"]
        for q in out.values():
            if q.get("all trace") and "all top eigenvalue" in q:
                q["all top / trace"] = q["all top eigenvalue"] / q["all trace"]
        return out

    def summary(self, rows: list[dict]) -> dict[str, float]:
        q = next(iter(self.per_checkpoint(rows).values()), {})
        names = {"all top eigenvalue": "hessian_top", "all trace": "hessian_trace"}
        return {f"lesion/{v}": q[k] for k, v in names.items() if k in q}

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        if row["quantity"] == "eigenvalue":
            return [(f"{row['group']} top{row['rank']}", row["value"])]
        if row["quantity"] == "trace":
            return [(f"{row['group']} trace", row["value"])]
        return []

    def measure(self, key: str) -> Measure:
        return TRACE if key.endswith("trace") else EIGEN

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        mine = self.mine(rows)
        if not mine:
            return []
        body = []
        for r in mine:
            if r["quantity"] == "eigenvalue":
                body.append([r["checkpoint"], r["group"], f"top-{r['rank']} eigenvalue", f"{r['value']:.4g}",
                             f"residual {r['residual']:.2g}" + ("" if r["converged"] else " (not converged)"),
                             str(r["hvps"])])  # fmt: skip
            elif r["quantity"] == "trace":
                body.append([r["checkpoint"], r["group"], "trace", f"{r['value']:.4g}",
                             f"95% CI [{r['ci_lo']:.4g}, {r['ci_hi']:.4g}], {r['samples']} samples"
                             + ("" if r["converged"] else " (not converged)"), str(r["hvps"])])  # fmt: skip
        note = (f"Hessian of the training loss on {mine[0]['sample']}, BN in eval mode, exact Hessian-vector "
                "products (double backward). Eigenvalues: Lanczos with full re-orthogonalisation, stopped at residual "
                f"≤ {meta['options']['hessian_tol']:g} × |λ|. Trace: Hutchinson (Rademacher), 95% t "
                "interval.")  # fmt: skip
        head = ["checkpoint", "parameters", "quantity", "value", "accuracy", "Hessian-vector products"]
        secs = [Section("Curvature: Hessian eigenvalues and trace", [note], (head, body))]
        per = self.per_checkpoint(rows)
        diffs = []
        for q in ("all top eigenvalue", "all trace", "all top / trace"):
            values = {ck: v[q] for ck, v in per.items() if q in v}
            diffs.append((q, net_differences(values, meta["checkpoints"])))
            if q != "all top / trace" and values and all(v > 0 for v in values.values()):
                # Curvature grows multiplicatively with depth in plain nets (seeds spread over orders of
                # magnitude): the difference of log10 values is the ratio, and its interval can resolve.
                logs = {ck: math.log10(v) for ck, v in values.items()}
                diffs.append((f"log10 {q}", net_differences(logs, meta["checkpoints"])))
        table = differences_table(diffs)
        if table[1]:
            secs.append(Section("Curvature: differences across seeds (Welch 95%)", table=table))
        if any(r["quantity"] == "density" for r in mine):
            secs[0].images.append("hessian_density.png")
        return secs

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        dens = [r for r in self.mine(rows) if r["quantity"] == "density"]
        if not dens:
            return None
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in dens:
            ax.semilogy(r["grid"], [max(d, 1e-12) for d in r["density"]], color=colour[r["checkpoint"]],
                        label=r["checkpoint"])  # fmt: skip
        ax.set(xlabel="eigenvalue", ylabel="density (log)", title="Hessian spectral density (SLQ)")
        ax.legend(fontsize=7)
        return save_figure(fig, out / "hessian_density.png")
