"""Paths study (Veit et al. Fig. 6b): shared forward + batched per-block VJPs vs the naive
way (one forward and one backward per routing, the unrouted path of every block detached),
side by side, interleaved rounds, median time. Both compute the same gradients; the
script checks that they agree before timing.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000 \\
    python scripts/bench_paths.py --models preact_resnet56 preact_resnet110 --images 32 --samples 2 --rounds 3

Routings: `samples` random subsets for every path length k = 0..n, as `ablate --studies paths`.
Weights are random with non-trivial BN statistics: the cost depends only on the net's shape.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch
import torch.nn.functional as F
from bench_lesion import timed, trained_like  # scripts/ is on sys.path when a script runs

from resnet_lab.ablation import paths


def naive(model, x, y, routes) -> torch.Tensor:
    """One forward and backward per routing."""
    out = []
    for route in routes.tolist():
        h0 = model.forward_stem(x).detach().requires_grad_()
        h = h0
        for blk, through_branch in zip(model.blocks, route):
            b, s = blk.branch(h), blk.shortcut(h)
            h = blk.merge(b, s.detach()) if through_branch else blk.merge(b.detach(), s)
        F.cross_entropy(model.forward_head(h), y, reduction="sum").backward()
        out.append(h0.grad)
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["preact_resnet56", "preact_resnet110"])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--samples", type=int, default=2, help="routings per path length")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.images,), generator=g)
    x, y = x.to(args.device), y.to(args.device)
    result = {}
    for name in args.models:
        model = trained_like(name).to(args.device)
        n = len(model.block_names)
        rng = random.Random(0)
        routes = torch.cat([paths.sample_routes(n, k, args.samples, rng) for k in range(n + 1)])
        times = {"naive": [], "shared": []}
        for r in range(args.rounds):
            tn, ref = timed(naive, model, x, y, routes)
            ts, (_, got) = timed(paths.routed_input_grads, model, x, y, routes)
            if r == 0:
                err = ((got - ref).norm() / ref.norm()).item()
                assert err < 1e-4, f"{name}: the two methods disagree (relative error {err:.2e})"
            times["naive"].append(tn)
            times["shared"].append(ts)
            print(f"{name} round {r + 1}: naive {tn:.1f}s, shared {ts:.1f}s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        result[name] = {
            "blocks": n,
            "routings": len(routes),
            "naive_s": round(med["naive"], 2),
            "shared_s": round(med["shared"], 2),
            "ratio": round(med["shared"] / med["naive"], 3),
            "rounds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        }
    print(json.dumps({"images": args.images, "samples": args.samples, "median": result,
                      "threads": torch.get_num_threads(), "device": args.device}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
