"""Single-block lesion sweep: prefix-shared engine vs the naive loop (one full forward
per removed block), side by side, interleaved rounds, median time.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000 \\
    python scripts/bench_lesion.py --models resnet56 resnet110 --images 1000 --rounds 3

Weights are random with non-trivial BN statistics: lesion cost does not depend on
what the network learned, only on its shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from resnet_lab.ablation import engine
from resnet_lab.models import create_model


def trained_like(name: str):
    torch.manual_seed(0)
    m = create_model(name)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval().to(memory_format=torch.channels_last)


def sync() -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args):
    """(seconds of fn(*args), the GPU's queued work included; its result)."""
    sync()
    t = time.perf_counter()
    r = fn(*args)
    sync()
    return time.perf_counter() - t, r


@torch.no_grad()
def naive(model, chunks, conds) -> float:
    sync()
    t = time.perf_counter()
    for x, y in chunks:
        for c in conds:  # one full forward pass of the modified network per condition
            with model.remove_blocks(c.removed):
                model(x).argmax(1).eq(y).sum()
    sync()
    return time.perf_counter() - t


@torch.no_grad()
def shared(model, chunks, conds) -> float:
    sync()
    t = time.perf_counter()
    engine.evaluate(model, chunks, conds)
    sync()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet56", "resnet110"])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=250)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.images,), generator=g)
    x, y = x.to(args.device), y.to(args.device)
    chunks = [(x[i : i + args.chunk], y[i : i + args.chunk]) for i in range(0, args.images, args.chunk)]
    result = {}
    for name in args.models:
        model = trained_like(name).to(args.device)
        conds = engine.single_block_conditions(model)  # intact + every block removed alone
        times = {"naive": [], "prefix": []}
        for r in range(args.rounds):
            times["naive"].append(naive(model, chunks, conds))
            times["prefix"].append(shared(model, chunks, conds))
            print(
                f"{name} round {r + 1}: naive {times['naive'][-1]:.1f}s, prefix {times['prefix'][-1]:.1f}s", flush=True
            )
        med = {k: statistics.median(v) for k, v in times.items()}
        result[name] = {
            "blocks": len(model.block_names),
            "naive_s": round(med["naive"], 2),
            "prefix_s": round(med["prefix"], 2),
            "ratio": round(med["prefix"] / med["naive"], 3),
        }
    print(
        json.dumps(
            {
                "images": args.images,
                "chunk": args.chunk,
                "rounds": args.rounds,
                "median": result,
                "threads": torch.get_num_threads(),
                "device": args.device,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
