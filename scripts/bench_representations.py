"""The representation studies from shared passes vs the naive way, side by side.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000 \\
    python scripts/bench_representations.py --models preact_resnet56 preact_resnet110 --images 128 --rounds 3

  iterative: one forward and one backward per batch for all blocks (`block_steps`) vs a
             forward to each block and a forward+backward from it, per block;
  probes:    the pooled output of the stem and every block from one forward pass
             (`pooled_features`) vs a forward up to each block's output, per block
             (the probe fits that follow are the same for both);
  cka:       one forward per minibatch, each Gram matrix once, every pair from them
             (`minibatch_cka` on `engine.representations`) vs, per pair of
             representations, the two forwards up to them and their Gram matrices.

Timing: interleaved rounds in this process, medians; the script checks that both ways give
the same numbers first. Peak RSS: each (model, study, way) once in a fresh child process
(`ru_maxrss`), so one way's peak never hides the other's. Weights are random, BN
statistics re-estimated on the input: the cost depends only on the net's shape.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from bench_lesion import trained_like  # scripts/ is on sys.path when a script runs

from resnet_lab.ablation import engine
from resnet_lab.ablation.studies.cka import grams, hsic1, minibatch_cka
from resnet_lab.ablation.studies.iterative import block_steps
from resnet_lab.ablation.studies.probes import pooled_features


def naive_iterative(model, x, y) -> list:
    out = []
    for i, blk in enumerate(model.blocks):
        with torch.no_grad():
            h = model.forward_until(x, i)
        h = h.clone().requires_grad_()
        with torch.enable_grad():
            if blk.downsample is None:
                g = torch.autograd.grad(F.cross_entropy(model.forward_from(h, i).double(), y, reduction="sum"), h)[0]
                f, r = blk.branch(h), h
            else:
                s = blk.shortcut(h).detach().requires_grad_()
                f = blk.branch(h)
                g = torch.autograd.grad(
                    F.cross_entropy(model.forward_from(blk.merge(f, s), i + 1).double(), y, reduction="sum"), s
                )[0]
                r = s
        f, r, g = (t.detach().flatten(1).double() for t in (f, r, g))
        out.append(F.cosine_similarity(f, g, dim=1))
    return out


def shared_iterative(model, x, y) -> list:
    return [s["cos"] for s in block_steps(model, x, y)]


@torch.no_grad()
def naive_probes(model, x, y) -> dict:
    feats = {"stem": model.forward_stem(x).mean((2, 3)).double()}
    for i, b in enumerate(model.block_names):
        feats[b] = model.forward_until(x, i + 1).mean((2, 3)).double()
    return feats


def shared_probes(model, x, y) -> dict:
    return pooled_features(model, [(x, y)])[0]


@torch.no_grad()
def naive_cka(model, x, y) -> torch.Tensor:
    def rep(i: int) -> torch.Tensor:
        return model.forward_stem(x) if i == 0 else model.forward_until(x, i)

    n = len(model.block_names) + 1
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            ki, kj = grams([rep(i)]), grams([rep(j)])
            out[i, j] = out[j, i] = (hsic1(ki, kj) / torch.sqrt(hsic1(ki, ki) * hsic1(kj, kj)))[0, 0]
    return out


@torch.no_grad()
def shared_cka(model, x, y) -> torch.Tensor:
    return minibatch_cka([[h for _, h in engine.representations(model, x)]])


WAYS = {
    "iterative": (naive_iterative, shared_iterative),
    "probes": (naive_probes, shared_probes),
    "cka": (naive_cka, shared_cka),
}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    if isinstance(a, list):
        return all(torch.allclose(u, v, rtol=1e-4, atol=1e-6) for u, v in zip(a, b))
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def net(name: str, x: torch.Tensor):
    """A random net with BN statistics re-estimated on the input: well-conditioned logits, like
    a trained net's (random BN statistics blow a deep net's logits up to ~100, saturating the
    softmax, and the iterative study's cosines of ~1e-12 gradients are rounding noise)."""
    model = trained_like(name)
    engine.recalibrate_bn(model, [(x[:8], None)])  # a few images: the child's RSS before a way stays low
    return model


def data(images: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (images,), generator=g)


def child(model_name: str, study: str, way: str, images: int) -> None:
    """Run one way once and print this process's peak RSS (MiB)."""
    x, y = data(images)
    model = net(model_name, x)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    WAYS[study][way == "shared"](model, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": round(peak / 1024), "above_start_mib": round((peak - base) / 1024)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["preact_resnet56", "preact_resnet110"])
    p.add_argument("--studies", nargs="+", default=list(WAYS), choices=list(WAYS))
    p.add_argument("--images", type=int, default=128, help="one batch (iterative, probes), one minibatch (cka)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", nargs=3, metavar=("MODEL", "STUDY", "WAY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child, args.images)
    x, y = data(args.images)
    result = {}
    for name in args.models:
        model = net(name, x)
        for study in args.studies:
            naive, shared = WAYS[study]
            times = {"naive": [], "shared": []}
            for r in range(args.rounds):
                t = time.perf_counter()
                ref = naive(model, x, y)
                times["naive"].append(time.perf_counter() - t)
                t = time.perf_counter()
                got = shared(model, x, y)
                times["shared"].append(time.perf_counter() - t)
                if r == 0 and not same(ref, got):
                    raise SystemExit(f"{name} {study}: the two ways disagree")
                print(f"{name} {study} round {r + 1}: naive {times['naive'][-1]:.2f}s, "
                      f"shared {times['shared'][-1]:.2f}s", flush=True)  # fmt: skip
            med = {k: statistics.median(v) for k, v in times.items()}
            rss = {}
            for way in ("naive", "shared"):
                cmd = [sys.executable, __file__, "--child", name, study, way, "--images", str(args.images)]
                rss[way] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            result[f"{name} {study}"] = {
                "naive_s": round(med["naive"], 3),
                "shared_s": round(med["shared"], 3),
                "ratio": round(med["shared"] / med["naive"], 3),
                "peak_rss_mib": {k: v["peak_mib"] for k, v in rss.items()},
                "rss_growth_mib": {k: v["above_start_mib"] for k, v in rss.items()},
                "rounds": {k: [round(t, 2) for t in v] for k, v in times.items()},
            }
    print(json.dumps({"images": args.images, "threads": torch.get_num_threads(), "median": result}, indent=2))


if __name__ == "__main__":
    main()
