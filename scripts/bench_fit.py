"""Images/s of `resnet-lab fit` vs a plain PyTorch loop.

Both train the same net (`--arch`, default ResNet-20) on the CIFAR-10 archive, batch 128,
with its family's optimiser (SGD for ResNets; AdamW and label smoothing 0.1 for ViTs and
ConvNeXts, sweeps/vit.yaml and convnext.yaml). Rounds are
interleaved (ours, baseline, ours, ...) so drift on the machine hits both; each round
times `--steps` steps after `--warmup` untimed ones, and the medians are compared.
  - CPU: the baseline is torchvision's PIL DataLoader with the paper's augmentation
    (pad 4 + random crop + flip), fp32; with `--baseline bare`, a bare loop of the same
    model on pre-made tensors (no data pipeline at all: the most a loop can do);
  - CUDA (`--device cuda`): fit runs with its GPU defaults (bf16 autocast, the dataset
    kept on the GPU, augmented there); the baseline is a bare CUDA loop on pre-made GPU
    tensors (no augmentation, bf16 autocast, channels_last): the most a loop can do.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000 \\
    python scripts/bench_fit.py --rounds 3 --steps 60 [--compile] [--device cuda]
    python scripts/bench_fit.py --arch cifar_vit6 --baseline bare --rounds 3 --steps 20 [--augment]

`--augment` also times fit with the ViT/ConvNeXt recipes' augmentation (RandAugment 2 ops at
magnitude 9, Mixup 0.8 / CutMix 1.0, random erasing 0.25; sweeps/vit.yaml): its cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from resnet_lab.data.cifar import CIFAR10DataModule
from resnet_lab.data.common import extract_archive, find_split_root
from resnet_lab.models import create_model
from resnet_lab.module import ResNetClassifier

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


class _Timer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.n = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.t0 is not None:
            self.n += len(batch[1])


def recipe(arch: str, params) -> tuple[torch.optim.Optimizer, float]:
    """(optimiser, label smoothing) of the family's recipe."""
    if create_model(arch).spec.family in ("cifar", "imagenet"):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4), 0.0
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05), 0.1


def bench_ours(
    dm: CIFAR10DataModule, steps: int, warmup: int, compile: bool, device: str = "cpu", arch: str = "resnet20"
) -> float:
    model = ResNetClassifier(arch, compile=compile, label_smoothing=recipe(arch, [torch.zeros(1)])[1])
    model.configure_optimizers = lambda: recipe(arch, model.parameters())[0]  # the family's, as its sweeps/ YAML
    timer = _Timer(warmup)
    trainer = pl.Trainer(
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device == "cuda" else "32-true",  # resnet-lab fit's defaults
    )
    trainer.fit(model, datamodule=dm)
    if device == "cuda":
        torch.cuda.synchronize()
    return timer.n / (time.perf_counter() - timer.t0)


def bench_bare(root: Path, steps: int, warmup: int, arch: str = "resnet20", device: str = "cuda") -> float:
    """A bare training loop on pre-made tensors on `device` (the first 128 * 32 images, or one
    batch per step when fewer steps are run): bf16 autocast on CUDA, fp32 on CPU, channels_last."""
    data = ImageFolder(
        str(root / "train"), T.Compose([T.ToTensor(), T.Normalize((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))])
    )
    n = min(len(data), 128 * max(2, min(32, warmup + steps)))
    x = torch.stack([data[i][0] for i in range(n)]).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([data[i][1] for i in range(n)]).to(device)
    model = create_model(arch).to(device).to(memory_format=torch.channels_last).train()
    opt, smoothing = recipe(arch, model.parameters())
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        j = (i * 128) % (n - 127)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = F.cross_entropy(model(x[j : j + 128]), y[j : j + 128], label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return steps * 128 / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_baseline(root: Path, steps: int, warmup: int, workers: int, arch: str = "resnet20") -> float:
    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
        ]
    )
    loader = DataLoader(
        ImageFolder(str(root / "train"), tf),
        batch_size=128,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    model = create_model(arch).train()
    opt, smoothing = recipe(arch, model.parameters())
    n, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t0 is not None:
            n += len(y)
        if i + 1 == warmup + steps:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default=str(ARCHIVE))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    p.add_argument("--compile", action="store_true", help="also time fit with model.compile=true")
    p.add_argument("--augment", action="store_true", help="also time fit with the ViT/ConvNeXt recipes' augmentation")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--arch", default="resnet20", help="a registered CIFAR net (resnet-lab models)")
    bare = "CPU baseline: a PIL DataLoader loop, or a bare loop on pre-made tensors (CUDA: always bare)"
    p.add_argument("--baseline", default="loader", choices=("loader", "bare"), help=bare)
    args = p.parse_args()
    torch.manual_seed(0)
    root = find_split_root(extract_archive(args.archive), ("train", "test"))
    dm = CIFAR10DataModule(folder=args.archive, download=False)
    variants = {"fit": (False, dm), **({"fit+compile": (True, dm)} if args.compile else {})}
    if args.augment:
        # The recipe's own values, read from sweeps/vit.yaml (the one place they are set).
        data_args = yaml.safe_load((REPO / "sweeps" / "vit.yaml").read_text())["data"]["init_args"]
        recipe_aug = {k: data_args[k] for k in ("randaugment", "randaugment_magnitude", "mixup", "cutmix", "erasing")}
        variants["fit+augment"] = (False, CIFAR10DataModule(folder=args.archive, download=False, **recipe_aug))
    res: dict[str, list[float]] = {k: [] for k in [*variants, "baseline"]}
    for r in range(args.rounds):
        for name, (comp, data) in variants.items():
            # compile's one-off cost is excluded by the warm-up steps (and its cache after round 1)
            warmup = args.warmup + (30 if comp else 0)
            res[name].append(bench_ours(data, args.steps, warmup, comp, args.device, args.arch))
        if args.device == "cuda" or args.baseline == "bare":
            res["baseline"].append(bench_bare(root, args.steps, args.warmup, args.arch, args.device))
        else:
            res["baseline"].append(bench_baseline(root, args.steps, args.warmup, args.workers, args.arch))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in res.items()), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(
        json.dumps(
            {
                "median_img_per_s": {k: round(v, 1) for k, v in med.items()},
                "ratio_vs_baseline": {k: round(med[k] / med["baseline"], 3) for k in variants},
                "arch": args.arch,
                "baseline": "bare" if args.device == "cuda" else args.baseline,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
