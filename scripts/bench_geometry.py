"""The geometry studies (landscape, hessian, shattered) against their baselines, side by side.

    python scripts/bench_geometry.py landscape --model resnet56 --images 1000 --rounds 5
    python scripts/bench_geometry.py hessian --models resnet20 resnet56 --images 256
    python scripts/bench_geometry.py rss --model resnet110 --images 1000
    python scripts/bench_geometry.py landscape --device cuda   # landscape and hessian: on a GPU (no TF32, as ablate)

  landscape: seconds per grid point of the study's way (write theta + a d1 + b d2 into a
             private copy in place, fold its BNs into their convolutions, evaluate pre-made
             tensors), and of the same without the fold, against one bare eval forward
             over the same images, and against the reference code's way (Li et al.: per point,
             deep-copy the model, add the directions, evaluate through a fresh DataLoader);
             interleaved rounds, medians.
  hessian:   Hessian-vector products to the top eigenvalue at 1e-3 relative accuracy, Lanczos
             (the study's) against power iteration (PyHessian's method), both from the same
             start; accuracy against a reference from a long Lanczos run, and also each
             method's own stopping rule (Lanczos: residual <= 1e-3 |theta|; PyHessian: relative
             change < 1e-3). And the seconds of one product (Lanczos's), and of one product
             in a block of 8 (Hutchinson's), against one forward+backward (the faster of NCHW
             and channels-last, as the nets train); and a product in a block the way the study
             ran before `for_products` made its convolutions ProductConvs (BNs affine, NCHW,
             PyTorch's own convolution double backward).
  rss:       peak RSS (ru_maxrss) of `resnet-lab ablate init:MODEL --studies S` for each
             geometry study, each in a fresh child process.

Random weights with BN statistics set as after training (bench_lesion.trained_like), random
inputs and labels: the costs depend on the net's shape; the eigenvalue counts on its
spectrum, which these stand-ins only approximate (the figures say so). So `hessian` also takes
trained nets (--checkpoints, their training loss and the study's seeded sample of training
images, read from --data):

    python scripts/bench_geometry.py hessian --checkpoints runs/r20/*/checkpoints/last.ckpt --images 256
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from bench_lesion import timed, trained_like  # scripts/ is on sys.path when a script runs
from torch.utils.data import DataLoader

from resnet_lab.ablation.engine import fold_bn
from resnet_lab.ablation.runner import full_float32
from resnet_lab.ablation.studies.hessian import BLOCK, affine_bns, for_products, lanczos, make_hvp
from resnet_lab.ablation.studies.landscape import directions, loss_error, set_point
from resnet_lab.cli import GLIBC_TUNABLES


def data(n: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return x.to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def bench_landscape(args) -> dict:
    model = trained_like(args.model).to(args.device)
    x, y = data(args.images, device=args.device)
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    d1, d2 = directions(theta, 2, 0)
    scratch = copy.deepcopy(model)
    net, refold = fold_bn(scratch)

    def study():
        set_point(scratch, theta, [d1, d2], [0.3, -0.2])
        refold()
        return loss_error(net, F.cross_entropy, x, y)

    def unfolded():  # the study's way before its BNs were folded into their convolutions
        set_point(scratch, theta, [d1, d2], [0.3, -0.2])
        return loss_error(scratch, F.cross_entropy, x, y)

    @torch.no_grad()
    def bare():
        total = 0.0
        for i in range(0, len(y), 500):
            total += float(F.cross_entropy(model(x[i : i + 500]), y[i : i + 500], reduction="sum"))
        return total / len(y)

    # Li et al.'s data: torchvision's CIFAR-10 dataset of PIL images with ToTensor + Normalize.
    from PIL import Image
    from torchvision import transforms

    pixels = (torch.rand(len(y), 32, 32, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    pil = [Image.fromarray(a.numpy()) for a in pixels]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    dataset = [(img, int(t)) for img, t in zip(pil, y)]

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return tf(dataset[i][0]), dataset[i][1]

    x_ref = torch.stack([tf(img) for img in pil])  # the same images as the study holds them, for the check

    @torch.no_grad()
    def reference():  # Li et al.'s loop: a copy per point, the directions added, a fresh loader
        m = copy.deepcopy(model)
        for name, p in m.named_parameters():
            p.add_(0.3 * d1[name] - 0.2 * d2[name])
        total = 0.0
        for xb, yb in DataLoader(Images(), batch_size=500, shuffle=False):
            xb = xb.to(args.device).contiguous(memory_format=torch.channels_last)
            total += float(F.cross_entropy(m(xb), yb.to(args.device), reduction="sum"))
        return total / len(y)

    def study_same_images():
        set_point(scratch, theta, [d1, d2], [0.3, -0.2])
        refold()
        xs = x_ref.to(args.device).contiguous(memory_format=torch.channels_last)
        return loss_error(net, F.cross_entropy, xs, y)[0]

    assert abs(study_same_images() - reference()) < 1e-4 * max(1.0, abs(reference()))
    times = {"study": [], "unfolded": [], "bare": [], "reference": []}
    for _ in range(args.rounds):
        for name, f in (("study", study), ("unfolded", unfolded), ("bare", bare), ("reference", reference)):
            times[name].append(timed(f)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    grid_points = 21 * 21 + 2 * (21 + 2)  # the grid and two 1D walks (G points and +-r/2)
    return {
        "model": args.model, "device": args.device, "images": args.images, "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "seconds_per_point": med, "study_over_bare": med["study"] / med["bare"],
        "study_over_reference": med["study"] / med["reference"], "unfolded_over_bare": med["unfolded"] / med["bare"],
        "grid21_estimate_s": grid_points * med["study"], "grid21_points": grid_points,
    }  # fmt: skip


def power_iteration(hvp, start: torch.Tensor, tol: float, max_iter: int, ref: float | None = None):
    """PyHessian's method: v <- Hv / ||Hv||, lambda = v.Hv; stops when the relative change is < tol.
    Returns (products to its own stop, lambda then, products to |lambda - ref| <= tol |ref|)."""
    v = start / start.norm()
    lam, own, hit = None, None, None
    for i in range(1, max_iter + 1):
        hv = hvp(v)
        new = float(v @ hv)
        if ref is not None and hit is None and abs(new - ref) <= tol * abs(ref):
            hit = i
        if own is None and lam is not None and abs(new - lam) < tol * abs(lam):
            own = (i, new)
        lam = new
        v = hv / hv.norm()
        if own is not None and (ref is None or hit is not None):
            break
    return own, hit, i


def lanczos_to_accuracy(hvp, dim, start, tol, ref, max_iter):
    """Products Lanczos needs for its top Ritz value to be within tol of `ref` (same start). A run
    of m steps is the prefix of a run of m + 1 (deterministic): the products are memoised, so
    the repeated runs cost the products of the longest one."""
    cache: dict[bytes, torch.Tensor] = {}

    def memo(v):
        key = v.numpy().tobytes()
        if key not in cache:
            cache[key] = hvp(v)
        return cache[key]

    for m in range(1, max_iter + 1):
        if abs(lanczos(memo, dim, 1, m, 0.0, start).ritz[0] - ref) <= tol * abs(ref):
            return m
    return None


def forward_backward(model, loss, x, y) -> None:
    with torch.enable_grad():
        model.zero_grad()
        loss(model(x), y).backward()


def hessian_nets(args):
    """(name, model in NCHW, loss, x, y): the stand-ins on random inputs, or
    with --checkpoints the trained nets, their training loss and the study's own sample of
    --images training images (seed 0, no augmentation)."""
    if not args.checkpoints:
        for name in args.models:
            x, y = data(args.images, device=args.device)
            model = trained_like(name).to(args.device, memory_format=torch.contiguous_format)
            yield name, model, F.cross_entropy, x.contiguous(), y
        return
    from functools import partial

    from resnet_lab.ablation.runner import batches, build_datamodule, load_checkpoint

    for path in args.checkpoints:
        ck = load_checkpoint(path)
        dm = build_datamodule(ck.data, folder=args.data, augment=False, batch_size=500, eval_batch_size=500)
        dm.setup("test")
        xs, ys = zip(*batches(dm, "train", loader=dm.sample_dataloader("train", args.images, 0)))
        loss = partial(F.cross_entropy, label_smoothing=ck.label_smoothing)
        yield (
            ck.label,
            ck.model.to(args.device, memory_format=torch.contiguous_format),
            loss,
            torch.cat(xs).contiguous().to(args.device),
            torch.cat(ys).to(args.device),
        )


def bench_hessian(args) -> list[dict]:
    out = []
    for name, model, loss, x, y in hessian_nets(args):
        hvp = make_hvp(for_products(copy.deepcopy(model)), loss, [(x, y)], [n for n, _ in model.named_parameters()])
        start = torch.randn(hvp.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        counts = {}
        if not args.seconds_only:
            ref = lanczos(hvp, hvp.dim, 1, args.max_iter, 1e-6, start).ritz[0]  # error <= residual^2 / gap
            own_lz = lanczos(hvp, hvp.dim, 1, args.max_iter, args.tol, start)
            lz_hit = lanczos_to_accuracy(hvp, hvp.dim, start, args.tol, ref, args.max_iter)
            own_pi, pi_hit, pi_ran = power_iteration(hvp, start, args.tol, args.max_iter, ref)
            counts = {
                "top_eigenvalue": ref, "lanczos_products_to_tol": lz_hit, "power_products_to_tol": pi_hit,
                "power_ran": pi_ran, "lanczos_own_stop": own_lz.hvps, "power_own_stop": own_pi[0] if own_pi else None,
                "power_own_stop_error": abs(own_pi[1] - ref) / abs(ref) if own_pi else None,
                "ratio_to_tol": lz_hit / pi_hit if lz_hit and pi_hit else None,
            }  # fmt: skip
        block = start[:, None].repeat(1, BLOCK) * torch.arange(1, BLOCK + 1, dtype=torch.float64)
        own_convs = make_hvp(affine_bns(copy.deepcopy(model)), loss, [(x, y)], [n for n, _ in model.named_parameters()])
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)  # as trained: the faster forward+backward
        x_last = x.contiguous(memory_format=torch.channels_last)
        t_hvp, t_block, t_own, t_fb, t_fb_last = [], [], [], [], []
        for _ in range(args.rounds):  # interleaved: a product, a block, the same with PyTorch's conv, fwd+bwd x2
            t_hvp.append(timed(hvp, start)[0])
            t_block.append(timed(hvp, block)[0] / BLOCK)
            t_own.append(timed(own_convs, block)[0] / BLOCK)
            t_fb.append(timed(forward_backward, model, loss, x, y)[0])
            t_fb_last.append(timed(forward_backward, last, loss, x_last, y)[0])
        fb = min(statistics.median(t_fb), statistics.median(t_fb_last))  # the faster of the two
        out.append({
            "model": name, "device": args.device, "images": args.images, "weights": hvp.dim, **counts,
            "graphs_kept": hvp.keeps, "seconds_per_product": statistics.median(t_hvp),
            "seconds_forward_backward_nchw": statistics.median(t_fb),
            "seconds_forward_backward_channels_last": statistics.median(t_fb_last),
            "seconds_forward_backward": fb,
            "seconds_per_product_in_a_block": statistics.median(t_block),
            "seconds_per_product_in_a_block_pytorch_conv": statistics.median(t_own),
            "block_product_over_forward_backward": statistics.median(t_block) / fb,
            "pytorch_conv_block_product_over_forward_backward": statistics.median(t_own) / fb,
            "product_over_forward_backward": statistics.median(t_hvp) / fb,
        })  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    return out


STUDY_FLAGS = {
    "landscape": ["--landscape-grid", "3", "--landscape-directions", "2"],
    # memory is per product, not per count; 8 Hutchinson samples fill one block of products
    "hessian": ["--hessian-max-iter", "8", "--hessian-tol", "0.5"],
    "shattered": ["--shattered-lines", "8", "--shattered-points", "64"],
}
IMAGES_FLAG = {"landscape": "--landscape-images", "hessian": "--hessian-images", "shattered": None}


def bench_rss(args) -> list[dict]:
    out = []
    for study, flags in STUDY_FLAGS.items():
        if study not in args.studies:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            images = [IMAGES_FLAG[study], str(args.images)] if IMAGES_FLAG[study] else []
            code = (
                "import resource, sys\nfrom resnet_lab.ablation.cli import main\ncode = main(sys.argv[1:])\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)"
            )
            cmd = [sys.executable, "-c", code,
                   f"init:{args.model}", "--data-folder", args.data, "--out", f"{tmp}/o", "--studies", study,
                   *flags, *images, "--no-progress"]  # fmt: skip
            t = time.perf_counter()  # the malloc setting the `resnet-lab` command restarts itself with
            res = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES}
            )
            if res.returncode:
                raise SystemExit(res.stderr[-2000:])
            kib = int(res.stdout.strip().splitlines()[-1])
            out.append({"study": study, "model": args.model, "images": args.images if images else 16,
                        "peak_rss_gib": kib / 2**20, "wall_s": time.perf_counter() - t})  # fmt: skip
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["landscape", "hessian", "rss"])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu", help="landscape, hessian: cpu or cuda")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--seconds-only", action="store_true", help="hessian: only the seconds, not the product counts")
    p.add_argument("--checkpoints", nargs="+", help="hessian: trained checkpoints instead of the stand-ins")
    p.add_argument("--studies", nargs="+", default=list(STUDY_FLAGS), help="rss: the studies to measure")
    p.add_argument(
        "--data",
        default="../shared/data/cifar10-jpeg.tar.gz",
        help="rss: the data folder for init: nets; hessian: the checkpoints' data",
    )
    args = p.parse_args()
    with full_float32(torch.device(args.device)):  # on CUDA no TF32, as `resnet-lab ablate` runs the studies
        result = {"landscape": bench_landscape, "hessian": bench_hessian, "rss": bench_rss}[args.what](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
