"""ImageNet (and anything in its layout): ImageFolder train/<wnid>/..., val/<wnid>/...

Training uses the paper's scale augmentation (Sec. 3.4): the shorter side is
sampled in [256, 480], then a random 224 crop and a horizontal flip; colour
jitter is optional. Evaluation resizes the shorter side to 256 and takes the
centre 224 crop, or ten crops (`ten_crop=True`, logits averaged by the module).
Sizes are options so that small-image stand-ins (tiny-imagenet, 64 px) run too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from .common import (
    DataError,
    absolute,
    check_classes,
    check_counts,
    extract_archive,
    find_split_root,
    folder_classes,
    is_archive,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _checked_loader(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f, Image.open(f) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"corrupt or non-image file {path}: {e}. Delete or replace it.") from e


class EvalShardSampler(DistributedSampler):
    """Rank r evaluates images r, r + world, ...: every image exactly once.

    Lightning's default DistributedSampler pads the last ranks with repeated images,
    which biases DDP metrics; as a DistributedSampler subclass this one is kept as is.
    """

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class ImageNetDataModule(pl.LightningDataModule):
    """Args:
    path: a folder or .tar/.tar.gz holding train/<class>/ and val/<class>/. For
        evaluation only (`validate`/`test`, `ablate`), val/<class>/ alone, or a
        folder of class folders (the val folder itself), is enough.
    batch_size / eval_batch_size: per device.
    num_workers: DataLoader worker processes.
    scale: shorter-side range for training (paper: 256..480).
    crop: training and evaluation crop (paper: 224).
    eval_resize: shorter side before the centre crop (paper: 256).
    ten_crop: evaluate on 10 crops (4 corners + centre, and their flips).
    color_jitter: strength of optional colour augmentation (0 = off).
    augment: random scale/crop/flip on training batches; False gives training
        batches the evaluation transform (e.g. for BN re-estimation).
    cache_dir: where archives are extracted (never next to the data).
    """

    location_arg = "path"  # the init argument that holds the data location (`ablate --data-folder`)

    def __init__(
        self,
        path: str = "data/imagenet",
        batch_size: int = 256,
        eval_batch_size: int = 256,
        num_workers: int = 8,
        scale: tuple[int, int] = (256, 480),
        crop: int = 224,
        eval_resize: int = 256,
        ten_crop: bool = False,
        color_jitter: float = 0.0,
        augment: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_counts(
            "data.init_args", batch_size=batch_size, eval_batch_size=eval_batch_size, crop=crop, eval_resize=eval_resize
        )
        if num_workers < 0:
            raise DataError(f"data.init_args.num_workers={num_workers} must be >= 0")
        if not 1 <= scale[0] <= scale[1]:
            raise DataError(f"data.init_args.scale={list(scale)} must be [low, high] with 1 <= low <= high")
        self.save_hyperparameters()
        # Absolute paths: a run's stored config and checkpoint work from any directory.
        self.hparams.update(path=absolute(path), cache_dir=absolute(cache_dir))
        self.root: Path | None = None
        self.split_dirs: dict[str, Path | None] = {}
        # Known at construction so the CLI can link it into model.num_classes; read from the
        # folder names (an archive's member names), never by extracting: that is prepare_data's.
        self.classes: list[str] = self._peek_classes()
        self.num_classes = len(self.classes)

    @classmethod
    def reads_location(cls, init: dict) -> bool:
        """ImageNet data always comes from `path` (its location argument)."""
        return True

    def eval_size(self, split: str) -> int:
        """Images of an evaluation split (after setup): val and test are both the val set."""
        return len(self.val_set)

    def resolved_paths(self) -> dict[str, str | None]:
        """The data locations, as absolute paths (what a run's config.yaml stores)."""
        return {k: self.hparams[k] for k in ("path", "cache_dir")}

    def _location(self) -> Path:
        p = Path(self.hparams.path)
        if not p.exists():
            raise DataError(
                f"no ImageNet data at {p}. Set --data.path to a folder or .tar.gz with train/<wnid>/ and "
                "val/<wnid>/ (e.g. ../shared/data/tiny-imagenet-10.tar.gz)"
            )
        return p

    def _peek_classes(self) -> list[str]:
        p = self._location()
        if is_archive(p):
            return folder_classes(p, splits=("train", "val"), bare=True)
        _, dirs = self._layout(p)
        folder = dirs["train"] or dirs["val"]
        return check_classes(folder, sorted(d.name for d in folder.iterdir() if d.is_dir()))

    def prepare_data(self) -> None:
        # One process extracts an archive into the cache; setup() on every rank then reads it.
        if is_archive(self._location()):
            extract_archive(self._location(), self.hparams.cache_dir)

    def _resolve(self) -> Path:
        if self.root is None:
            p = self._location()
            top = extract_archive(p, self.hparams.cache_dir) if is_archive(p) else p
            self.root, self.split_dirs = self._layout(top)
        return self.root

    def _layout(self, top: Path) -> tuple[Path, dict[str, Path | None]]:
        """(root, {train, val}) of a tree: train/ and val/, or an evaluation-only layout."""
        try:
            root = find_split_root(top, ("train", "val"))
            return root, {"train": root / "train", "val": root / "val"}
        except DataError:
            return self._eval_only(top)

    @staticmethod
    def _eval_only(top: Path) -> tuple[Path, dict[str, Path | None]]:
        """val/<class>/ without train/, or `top` itself a folder of class folders."""
        try:
            root = find_split_root(top, ("val",))
            return root, {"train": None, "val": root / "val"}
        except DataError:
            pass
        if any(d.is_dir() and any(f.is_file() for f in d.iterdir()) for d in top.iterdir()):
            return top, {"train": None, "val": top}
        raise DataError(
            f"{top} has no train/<wnid>/ and val/<wnid>/ folders (nor val/ alone, nor class folders of images); "
            "expected an ImageNet-layout tree"
        )

    def _transforms(self, train: bool):
        hp = self.hparams
        norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
        if train and hp.augment:
            lo, hi = hp.scale
            aug = [
                T.RandomChoice([T.Resize(s) for s in range(lo, hi + 1)]) if hi > lo else T.Resize(lo),
                T.RandomCrop(hp.crop),
                T.RandomHorizontalFlip(),
            ]
            if hp.color_jitter:
                aug.append(T.ColorJitter(hp.color_jitter, hp.color_jitter, hp.color_jitter))
            return T.Compose(aug + norm)
        if hp.ten_crop and not train:
            crops = T.Lambda(lambda cs: torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(c)) for c in cs]))
            return T.Compose([T.Resize(hp.eval_resize), T.TenCrop(hp.crop), crops])  # (10, 3, crop, crop)
        return T.Compose([T.Resize(hp.eval_resize), T.CenterCrop(hp.crop), *norm])

    def setup(self, stage: str | None = None) -> None:
        root = self._resolve()
        train, val_dir = self.split_dirs["train"], self.split_dirs["val"]
        if train is None and stage == "fit":
            raise DataError(f"{root} has no train/<wnid>/ folder; training needs one (evaluation does not)")
        val = ImageFolder(str(val_dir), self._transforms(False), loader=_checked_loader)
        self.train_set = None
        if train is not None:
            self.train_set = ImageFolder(str(train), self._transforms(True), loader=_checked_loader)
            if self.train_set.classes != val.classes:
                raise DataError(f"{root}: val/ classes differ from train/ classes")
        if val.classes != self.classes:
            raise DataError(f"{root}: its class folders changed since the model was built; run again")
        # ImageFolder lists images class by class; a fixed shuffle makes any prefix
        # (limit_val_batches, an ablation's --limit) a fair sample of all classes.
        perm = torch.randperm(len(val), generator=torch.Generator().manual_seed(0)).tolist()
        self.val_set = Subset(val, perm)

    def _loader(self, ds, train: bool) -> DataLoader:
        hp = self.hparams
        t = self.trainer
        sampler = None
        if not train and t is not None and t.world_size > 1:
            sampler = EvalShardSampler(ds, t.world_size, t.global_rank)
        return DataLoader(
            ds,
            batch_size=hp.batch_size if train else hp.eval_batch_size,
            shuffle=train,
            sampler=sampler,
            drop_last=train,
            num_workers=hp.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise DataError(
                f"{self.root} has only evaluation images; training batches (fit, --bn-recalib) need train/<wnid>/"
            )
        return self._loader(self.train_set, True)

    def sample_dataloader(self, split: str, n: int, seed: int) -> DataLoader:
        """`n` images of `split` drawn at random from `seed` alone, in evaluation batches
        (e.g. the training images `ablate --bn-recalib` re-estimates BN on)."""
        ds = {"train": self.train_set, "val": self.val_set, "test": self.val_set}[split]
        if ds is None:
            raise DataError(f"{self.root} has no {split}/ images; --bn-recalib needs train/<wnid>/")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        return self._loader(Subset(ds, idx), False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)  # ImageNet's test labels are not public: val is the test
