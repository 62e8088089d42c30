"""CIFAR-10 as one uint8 tensor on the training device (airbench style).

Sources, tried in this order by `source="auto"`:
  1. torchvision's CIFAR-10 python files in `root` (downloaded there when online);
  2. an ImageFolder tree or .tar.gz with {train,test}/<class>/... (`folder=`), e.g. the
     offline copy ../shared/data/cifar10-jpeg.tar.gz;
  3. `source="synthetic"`: a small random set for smoke tests. Never chosen silently.
An explicit `folder` is tried before a download, so an offline machine never waits on
the network. The decoded set is cached as uint8 tensors, so later runs start in ~1 s.

Preprocessing follows He et al. Sec. 4.2: per-pixel mean subtraction (mean of the
training split), then pad 4 / random 32x32 crop / horizontal flip for training. The
augmentation runs batched on the device in `on_after_batch_transfer`, not per image
in PIL worker processes (which costs 8-13% end to end on 2 CPU cores). The ViT and ConvNeXt
recipes add RandAugment, random erasing and Mixup/CutMix (`augment.py`), batched the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import is_seed, not_a_seed
from .augment import check_options, mix_batch, rand_augment, random_erasing
from .common import (
    DataError,
    absolute,
    cache_root,
    check_counts,
    decode_image,
    folder_classes,
    iter_image_members,
    source_key,
)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_torchvision_files(root: str | os.PathLike, download: bool) -> dict[str, Tensor]:
    """torchvision's CIFAR10 (python pickles) -> tensors; raises when absent/offline."""
    from torchvision.datasets import CIFAR10

    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = CIFAR10(str(root), train=train, download=download)
        out[f"{split}_x"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        out[f"{split}_y"] = torch.tensor(ds.targets, dtype=torch.int64)
    return out


def torchvision_files_present(root: str | os.PathLike) -> bool:
    return (Path(root) / "cifar-10-batches-py" / "batches.meta").is_file()


def load_image_folder(path: str | os.PathLike) -> dict[str, Tensor]:
    """Decode {train,test}/<class>/*.jpg from a tree or archive into uint8 tensors."""
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[str]] = {"train": [], "test": []}
    for parts, name, data in iter_image_members(path):
        split = next((s for s in ("train", "test") if s in parts[:-2]), None)
        if split is None:
            continue
        images[split].append(decode_image(data, name, (32, 32)))
        labels[split].append(parts[-2])
    if not images["train"] or not images["test"]:
        raise DataError(
            f"{path} holds no train/ and test/ images; expected {{train,test}}/<class>/*.jpg "
            "(the layout of ../shared/data/cifar10-jpeg.tar.gz)"
        )
    classes = sorted(set(labels["train"]))
    if set(labels["test"]) - set(classes):
        raise DataError(f"{path}: test classes {sorted(set(labels['test']) - set(classes))} are not in train/")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for s in ("train", "test"):
        out[f"{s}_x"] = torch.from_numpy(np.stack(images[s])).permute(0, 3, 1, 2).contiguous()
        out[f"{s}_y"] = torch.tensor([index[c] for c in labels[s]], dtype=torch.int64)
    out["classes"] = classes  # type: ignore[assignment]
    return out


def synthetic_cifar(n_train: int = 2000, n_test: int = 500, seed: int = 0) -> dict[str, Tensor]:
    """A learnable toy set: each class is a noisy colour/stripe pattern."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 256, (10, 3, 32, 32), generator=g).float()
    out = {}
    for s, n in (("train", n_train), ("test", n_test)):
        y = torch.randint(0, 10, (n,), generator=g)
        x = 0.6 * protos[y] + 0.4 * torch.randint(0, 256, (n, 3, 32, 32), generator=g).float()
        out[f"{s}_x"], out[f"{s}_y"] = x.to(torch.uint8), y
    return out


def random_crop_flip(x: Tensor, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Batched augmentation: zero-pad `pad`, random crop back to (H, W), random h-flip.

    x: (B, C, H, W) float, already mean-subtracted (so the padding is the mean colour).
    Every sample gets its own offsets (dy, dx) in [0, 2*pad] and its own flip.
    """
    b, _, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is a reversed column index
    bi = torch.arange(b, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)  # (B, C, H, W), channels_last in memory


class TensorLoader:
    """Batches of (uint8 images, labels) sliced from tensors on one device.

    Sharded by (rank, world). Training (drop_last) gives every rank the same number
    of images, like a DistributedSampler. Evaluation gives rank r the images
    r, r + world, ...: every image exactly once, none repeated, so DDP metrics equal
    the single-process ones (ranks may then hold one batch more or less; the
    module syncs its metrics once per epoch, never per step).

    Shuffled order: epoch e is a permutation seeded by `seed + e`. `position()` (the
    number of training batches already consumed; the trainer's global step) picks the
    epoch and the batch to start from, so a run resumed mid-epoch continues exactly the
    order the uninterrupted run would have had.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        position: Callable[[], int] | None = None,
    ) -> None:
        self.x, self.y, self.bs = x, y, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world = rank, world
        self.position = position
        self._epochs_started = 0  # without `position`: count epochs here

    def _per_rank(self) -> int:
        n = len(self.y)
        if self.world == 1:
            return n
        return n // self.world if self.drop_last else len(range(self.rank, n, self.world))

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.bs if self.drop_last else -(-n // self.bs)

    def order(self, epoch: int) -> Tensor:
        """This rank's image indices for `epoch`."""
        n = len(self.y)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)) if self.shuffle else None
        idx = torch.arange(n) if idx is None else idx
        if self.world > 1:
            idx = idx[self.rank :: self.world][: self._per_rank()]
        return idx

    def __iter__(self):
        if self.position is not None and len(self):
            epoch, start = divmod(self.position(), len(self))
        else:
            epoch, start = self._epochs_started, 0
        self._epochs_started += 1
        idx = self.order(epoch).to(self.x.device)
        for i in range(start, len(self)):
            j = idx[i * self.bs : (i + 1) * self.bs]
            yield self.x[j], self.y[j]


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 with the paper's 45k/5k split, per-pixel mean and batched augmentation.

    Args:
        source: "auto", "torchvision", "folder" or "synthetic" (see module docstring).
        root: where torchvision's files live or are downloaded to (default: cache).
        folder: an ImageFolder tree or .tar.gz with {train,test}/<class>/.
        download: allow torchvision's download when its files are absent.
        val_size: images held out of the 50k for validation (paper: 5000); 0 = train on all.
        split_seed: seed of the train/val split.
        batch_size / eval_batch_size: per device.
        train_subset / eval_subset: take only the first N images (smoke tests, presets).
        augment: pad-4 crop + flip on training batches (False: no augmentation at all).
        randaugment / randaugment_magnitude: RandAugment ops per image (0 = off) and their
            magnitude bin (0..30, torchvision's default 9), on the uint8 images before the crop.
        erasing: random-erasing probability per image, after the crop (0 = off).
        mixup / cutmix: Beta alpha of Mixup / CutMix per batch (0 = off; both > 0: one of
            them per batch). Training batches then carry soft targets for the loss.
        cache_dir: decoded-tensor cache (default $RESNET_LAB_CACHE or ~/.cache/resnet-lab).
        on_device: keep the whole set on the training device (GPU); default: when CUDA.
    """

    location_arg = "folder"  # the init argument that holds the data location (`ablate --data-folder`)

    def __init__(
        self,
        source: str = "auto",
        root: str | None = None,
        folder: str | None = None,
        download: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        augment: bool = True,
        randaugment: int = 0,
        randaugment_magnitude: int = 9,
        erasing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        cache_dir: str | None = None,
        on_device: bool | None = None,
    ) -> None:
        super().__init__()
        if source not in ("auto", "torchvision", "folder", "synthetic"):
            raise DataError(f"unknown CIFAR source {source!r}; valid: auto, torchvision, folder, synthetic")
        check_counts(
            "data.init_args",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            train_subset=train_subset,
            eval_subset=eval_subset,
        )
        check_options(randaugment, randaugment_magnitude, erasing, mixup, cutmix)
        if val_size < 0:
            raise DataError(f"data.init_args.val_size={val_size} must be >= 0 (0 trains on all 50k images)")
        if not is_seed(split_seed):
            raise DataError(f"data.init_args.split_seed={not_a_seed(split_seed)}")
        self.save_hyperparameters()
        # Absolute paths: a run's stored config and checkpoint work from any directory.
        self.hparams.update(root=absolute(root), folder=absolute(folder), cache_dir=absolute(cache_dir))
        self.classes: list[str] = self._peek_classes()
        self.num_classes = len(self.classes)  # known now: the CLI links it into the model
        self.mean: Tensor | None = None  # (3, 32, 32), of the training split

    @classmethod
    def reads_location(cls, init: dict[str, Any]) -> bool:
        """Whether these init args read the data from `folder` (its location argument):
        source folder, or auto without torchvision's files to take over."""
        source = init.get("source", "auto")
        if source != "auto":
            return source == "folder"
        return not torchvision_files_present(init.get("root") or cache_root(init.get("cache_dir")) / "torchvision")

    def eval_size(self, split: str) -> int:
        """Images of an evaluation split (after setup)."""
        return len(self.splits[split][1])

    def resolved_paths(self) -> dict[str, str | None]:
        """The data locations, as absolute paths (what a run's config.yaml stores)."""
        return {k: self.hparams[k] for k in ("root", "folder", "cache_dir")}

    def _peek_classes(self) -> list[str]:
        """The class names of the source `setup` will load, without decoding images."""
        hp = self.hparams
        if not (hp.source in ("auto", "folder") and hp.folder and Path(hp.folder).exists()):
            return list(CLASSES)
        tv_root = hp.root or cache_root(hp.cache_dir) / "torchvision"
        if hp.source == "folder" or not torchvision_files_present(tv_root):
            decoded = self._decoded_path()
            classes = torch.load(decoded, mmap=True).get("classes") if decoded.exists() else None
            return list(classes) if classes else folder_classes(hp.folder)  # a decoded cache spares listing (~5 s)
        return list(CLASSES)

    def _decoded_path(self) -> Path:
        """The decoded cache of data.folder (changes with any file of the tree or the archive)."""
        return cache_root(self.hparams.cache_dir) / f"cifar10-folder-{source_key(self.hparams.folder)}.pt"

    # -- loading ------------------------------------------------------------
    def _load_source(self) -> tuple[dict[str, Tensor], str]:
        hp, tried = self.hparams, []
        cache = cache_root(hp.cache_dir)
        if hp.source == "synthetic":
            return synthetic_cifar(), "synthetic"
        if hp.source in ("auto", "torchvision"):
            root = Path(hp.root or cache / "torchvision")
            try:
                return load_torchvision_files(root, download=False), f"torchvision:{root}"
            except RuntimeError as e:
                tried.append(f"torchvision files in {root}: {str(e).splitlines()[0]}")
        if hp.source in ("auto", "folder") and hp.folder:
            if not Path(hp.folder).exists():
                tried.append(f"folder {hp.folder}: does not exist")
            else:
                path = self._decoded_path()
                key = path.stem.removeprefix("cifar10-")
                if path.exists():
                    return torch.load(path, mmap=True), key
                data = load_image_folder(hp.folder)
                _save_atomic(data, path)
                return data, key
        elif hp.source == "folder":
            tried.append("folder: data.folder is not set")
        if hp.source in ("auto", "torchvision") and hp.download:
            try:
                return load_torchvision_files(root, download=True), f"torchvision:{root}"
            except Exception as e:  # offline: URLError, socket errors, ...
                tried.append(f"torchvision download to {root}: {type(e).__name__}: {e}")
        raise DataError(
            "no CIFAR-10 data found. Tried:\n  - " + "\n  - ".join(tried) + "\n"
            "Provide one: --data.folder path/to/cifar10-jpeg.tar.gz (an ImageFolder tree or archive with "
            "{train,test}/<class>/), or --data.root DIR holding torchvision's cifar-10-batches-py "
            "(downloaded there when online), or --data.source synthetic for a smoke test."
        )

    def prepare_data(self) -> None:
        # Rank 0 decodes and caches once; other ranks then read the cache in setup().
        self._load_source()

    def setup(self, stage: str | None = None) -> None:
        if self.mean is not None:
            return
        data, self.source_name = self._load_source()
        hp = self.hparams
        classes = list(data.get("classes", CLASSES))  # type: ignore[arg-type]
        if classes != self.classes:
            raise DataError(
                f"{self.source_name} holds classes {classes}, but {self.classes} were expected when the model "
                "was built; the data changed while loading, run again"
            )
        x, y = data["train_x"], data["train_y"]
        n = len(y)
        if not 0 <= hp.val_size < n:
            raise DataError(f"val_size={hp.val_size} must be in [0, {n}) for {n} training images")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(hp.split_seed))
        tr, va = perm[: n - hp.val_size], perm[n - hp.val_size :]
        if hp.train_subset:
            tr = tr[: hp.train_subset]
        if hp.eval_subset:
            va = va[: hp.eval_subset]
        # Archives list the test set class by class: a seeded shuffle makes any prefix
        # (eval_subset, an ablation's --limit) a fair sample of all classes.
        te = torch.randperm(len(data["test_y"]), generator=torch.Generator().manual_seed(hp.split_seed))
        te = te[: hp.eval_subset or None]
        self.splits = {
            "train": (x[tr].contiguous(), y[tr].contiguous()),
            "val": (x[va].contiguous(), y[va].contiguous()),
            "test": (data["test_x"][te].contiguous(), data["test_y"][te].contiguous()),
        }
        self.mean = self.splits["train"][0].float().div_(255).mean(0)  # (3, 32, 32) per-pixel mean
        device = self._device()
        if device.type != "cpu":
            self.splits = {k: (a.to(device), b.to(device)) for k, (a, b) in self.splits.items()}
        self.mean = self.mean.to(device)

    def _device(self) -> torch.device:
        on = self.hparams.on_device
        trainer = self.trainer
        dev = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if on is None:
            on = dev.type == "cuda"
        return dev if on else torch.device("cpu")

    # -- loaders --------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> TensorLoader:
        x, y = self.splits[split]
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        bs = self.hparams.batch_size if train else self.hparams.eval_batch_size
        position = self._batches_done if train and t is not None else None
        return TensorLoader(
            x, y, bs, shuffle=train, drop_last=train, seed=self.run_seed(), rank=rank, world=world, position=position
        )

    def run_seed(self) -> int:
        """The run's seed (`seed_everything`), which drives the data order and the
        augmentation; the train/val split stays fixed by `split_seed`."""
        return int(os.environ.get("PL_GLOBAL_SEED", self.hparams.split_seed))

    def _batches_done(self) -> int:
        t = self.trainer
        return t.global_step * t.accumulate_grad_batches

    def train_dataloader(self) -> TensorLoader:
        return self._loader("train", True)

    def sample_dataloader(self, split: str, n: int, seed: int) -> TensorLoader:
        """`n` images of `split` drawn at random from `seed` alone (not the run's seed, which a
        sweep's fit sets in the environment), unaugmented, in evaluation batches: e.g. the
        training images `ablate --bn-recalib` re-estimates BN on."""
        x, y = self.splits[split]
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].to(y.device)
        return TensorLoader(x[idx], y[idx], self.hparams.eval_batch_size, shuffle=False, drop_last=False)

    def val_dataloader(self) -> TensorLoader | list:
        return self._loader("val", False) if len(self.splits["val"][1]) else []

    def test_dataloader(self) -> TensorLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> TensorLoader:
        return self._loader("test", False)

    def normalize(self, x: Tensor) -> Tensor:
        """(B, 3, 32, 32) uint8 -> float32, mean-subtracted, channels_last."""
        x = x.to(memory_format=torch.channels_last).float().div_(255)
        return x.sub_(self.mean.to(x.device))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        hp = self.hparams
        t = self.trainer
        if not (hp.augment and t is not None and t.training):
            return self.normalize(x), y
        # One generator per (run seed, batch): the same augmentation after a resume. The
        # recipes' additions draw from a second stream, so crop + flip stay what they were.
        batch_index = t.fit_loop.epoch_loop.batch_progress.total.ready  # this batch's, over the run
        seed = self.run_seed() * 1_000_003 + batch_index
        g = torch.Generator(x.device).manual_seed(seed)
        extra = torch.Generator(x.device).manual_seed(seed + 2**40)
        if hp.randaugment:
            x = rand_augment(x, hp.randaugment, hp.randaugment_magnitude, extra)
        x = random_crop_flip(self.normalize(x), generator=g)
        if hp.erasing:
            x = random_erasing(x, hp.erasing, extra)
        if hp.mixup or hp.cutmix:
            return mix_batch(x, y, self.num_classes, hp.mixup, hp.cutmix, extra)
        return x, y
