"""DataModules: sources, split, mean, batched augmentation, bad input."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_lab.data.cifar import CIFAR10DataModule, TensorLoader, random_crop_flip
from resnet_lab.data.common import DataError
from resnet_lab.data.imagenet import ImageNetDataModule

from .conftest import CIFAR_ARCHIVE, TINY_IMAGENET, need


def test_crops_stay_inside_padded_image_and_flips_are_exact():
    torch.manual_seed(0)
    b, h = 64, 8
    x = torch.randn(b, 3, h, h)
    out = random_crop_flip(x, pad=2)
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(b):
        matches = [
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(xp[i, :, dy : dy + h, dx : dx + h]))
        ]
        assert len(matches) == 1, f"sample {i} is not exactly one crop(+flip) of its own padded image"
        seen.add(matches[0])
    # Offsets and flips vary across the batch.
    assert len({m[:2] for m in seen}) > 10 and {m[2] for m in seen} == {False, True}


def test_loader_keeps_labels_aligned_and_shards():
    # Channel 0 of each image is its label, channel 1 its index: after shuffling,
    # sharding and augmentation the centre pixel (never padding) still matches.
    y = torch.arange(101) % 10
    x = torch.stack([y, torch.arange(101), torch.zeros(101, dtype=torch.long)], 1)
    x = x.view(-1, 3, 1, 1).expand(-1, 3, 32, 32).to(torch.uint8).contiguous()
    train_ids = []
    for rank in (0, 1):
        loader = TensorLoader(x, y, batch_size=16, shuffle=True, drop_last=True, seed=3, rank=rank, world=2)
        assert len(loader) == 3
        ids = []
        for xb, yb in loader:
            aug = random_crop_flip(xb.float())
            assert torch.equal(aug[:, 0, 16, 16].long(), yb)
            ids += xb[:, 1, 0, 0].tolist()
        assert len(ids) == len(set(ids)) == 48
        train_ids.append(set(ids))
    assert not train_ids[0] & train_ids[1]  # disjoint shards
    # Evaluation: every image exactly once over the ranks, none repeated or dropped.
    eval_ids = []
    for rank in (0, 1):
        loader = TensorLoader(x, y, batch_size=16, shuffle=False, drop_last=False, rank=rank, world=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        eval_ids += [i for xb, _ in batches for i in xb[:, 1, 0, 0].tolist()]
    assert sorted(eval_ids) == list(range(101))
    loader = TensorLoader(x, y, batch_size=16, shuffle=False, drop_last=False)
    assert len(loader) == 7 and sum(len(b[1]) for b in loader) == 101


def test_eval_shard_sampler_covers_every_image_once():
    from resnet_lab.data.imagenet import EvalShardSampler

    ds = list(range(11))
    got = [list(EvalShardSampler(ds, 3, r)) for r in range(3)]
    assert sorted(i for g in got for i in g) == ds and [len(EvalShardSampler(ds, 3, r)) for r in range(3)] == [4, 4, 3]


def test_synthetic_split_and_mean(cache_dir):
    dm = CIFAR10DataModule(source="synthetic", val_size=300, split_seed=1)
    dm.setup()
    (xt, yt), (xv, yv) = dm.splits["train"], dm.splits["val"]
    assert len(yt) == 1700 and len(yv) == 300
    torch.testing.assert_close(dm.mean, xt.float().div(255).mean(0))
    # Seeded: the same split again, a different one with another seed.
    dm2 = CIFAR10DataModule(source="synthetic", val_size=300, split_seed=1)
    dm2.setup()
    assert torch.equal(dm2.splits["val"][1], yv)
    dm3 = CIFAR10DataModule(source="synthetic", val_size=300, split_seed=2)
    dm3.setup()
    assert not torch.equal(dm3.splits["val"][0], xv)
    # Eval batches are normalized, not augmented.
    xb, _ = next(iter(dm.val_dataloader()))
    out, _ = dm.on_after_batch_transfer((xb, None), 0)
    torch.testing.assert_close(out, xb.float() / 255 - dm.mean)


@pytest.mark.slow
def test_cifar_archive_decodes_and_caches(cache_dir, monkeypatch):
    dm = CIFAR10DataModule(folder=str(need(CIFAR_ARCHIVE)), download=False, val_size=5000)
    dm.setup()
    assert dm.classes[0] == "airplane" and dm.num_classes == 10
    assert dm.splits["train"][0].shape == (45000, 3, 32, 32) and dm.splits["train"][0].dtype == torch.uint8
    assert len(dm.splits["val"][1]) == 5000 and len(dm.splits["test"][1]) == 10000
    assert torch.bincount(dm.splits["test"][1]).tolist() == [1000] * 10
    assert list(cache_dir.glob("cifar10-folder-*.pt"))
    # Once decoded, a new DataModule reads the class names from the cache: listing the archive's
    # 60,000 members took ~5 s at the start of every fit, ablate and sweep trial.
    with monkeypatch.context() as m:
        m.setattr("resnet_lab.data.cifar.folder_classes", None)  # any call would fail
        all50k = CIFAR10DataModule(folder=str(CIFAR_ARCHIVE), download=False, val_size=0)
    assert all50k.classes == dm.classes
    all50k.setup()
    assert len(all50k.splits["train"][1]) == 50000 and all50k.val_dataloader() == []
    # The archive lists test images class by class; a subset must still cover every class.
    sub = CIFAR10DataModule(folder=str(CIFAR_ARCHIVE), download=False, eval_subset=500)
    sub.setup()
    assert torch.bincount(sub.splits["test"][1], minlength=10).min() > 20


def test_no_data_found_names_sources_and_fix(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "empty"), folder=str(tmp_path / "nope.tar.gz"), download=False)
    with pytest.raises(DataError) as e:
        dm.setup()
    msg = str(e.value)
    assert "torchvision files in" in msg and "nope.tar.gz: does not exist" in msg
    assert "--data.folder" in msg and "--data.source synthetic" in msg


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), color, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _tree(root, splits=("train", "test"), bad=None):
    for s in splits:
        for c in ("cat", "dog"):
            d = root / s / c
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"{i}.jpg").write_bytes(_jpeg(40 * i))
    if bad:
        (root / bad).write_bytes(b"this is not a jpeg")
    return root


def test_corrupt_file_is_named(tmp_path, cache_dir):
    root = _tree(tmp_path / "cifar", bad="train/cat/broken.jpg")
    with pytest.raises(DataError, match=r"corrupt or non-image file .*train/cat/broken.jpg"):
        CIFAR10DataModule(folder=str(root), download=False, val_size=1).setup()
    inet = _tree(tmp_path / "inet", splits=("train", "val"), bad="val/dog/broken.jpg")
    dm = ImageNetDataModule(str(inet), num_workers=0, scale=(32, 36), crop=32, eval_resize=32)
    dm.setup()
    with pytest.raises(DataError, match=r"corrupt or non-image file .*val/dog/broken.jpg"):
        list(dm.val_dataloader())


@pytest.mark.slow
def test_tiny_imagenet_layout_and_transforms(cache_dir):
    dm = ImageNetDataModule(
        str(need(TINY_IMAGENET)), batch_size=8, num_workers=0, scale=(64, 80), crop=56, eval_resize=64
    )
    assert dm.num_classes == 10
    dm.setup()
    assert len(dm.train_set) == 5000 and len(dm.val_set) == 500
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 56, 56) and y.max() < 10
    ten = ImageNetDataModule(str(TINY_IMAGENET), ten_crop=True, crop=56, eval_resize=64, num_workers=0)
    ten.setup()
    assert ten.val_set[0][0].shape == (10, 3, 56, 56)
    with pytest.raises(DataError, match="--data.path"):
        ImageNetDataModule("/nonexistent/imagenet")
