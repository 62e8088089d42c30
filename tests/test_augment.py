"""The ViT/ConvNeXt recipes' augmentation (data/augment.py): RandAugment equal to
torchvision's operations image by image, random erasing's distribution equal to torchvision's,
Mixup/CutMix's images and soft targets, the loss taken against them, a resumed fit repeating
them, and bad options refused."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, v2

from resnet_lab.data.augment import NAMES, OPS, apply_op, check_options, mix_batch, rand_augment, random_erasing
from resnet_lab.data.common import DataError
from resnet_lab.module import ResNetClassifier
from resnet_lab.train import cli_main

from .conftest import fit_args, one_message
from .test_seeds import Batches


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth uint8 images (a blurred random field), so that geometry and histograms matter."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


@pytest.mark.parametrize("magnitude", [9, 30])
@pytest.mark.parametrize("name", NAMES)
def test_each_operation_equals_torchvisions_randaugment_image_by_image(name, magnitude):
    x = images(6)
    tv = v2.RandAugment(magnitude=magnitude)
    fn, signed = tv._AUGMENTATION_SPACE[name]
    ms = fn(tv.num_magnitude_bins, 32, 32)
    assert OPS[name][1] == signed
    for negative in (False, True) if signed else (False,):
        m = 0.0 if ms is None else float(ms[magnitude]) * (-1 if negative else 1)
        want = torch.stack(
            [tv._apply_image_or_video_transform(img, name, m, InterpolationMode.NEAREST, tv._fill) for img in x]
        )
        got = apply_op(x, name, magnitude, negative)
        assert torch.equal(got, want), (name, negative)
        if name not in ("Identity",) and magnitude == 30:
            assert not torch.equal(got, x), name  # the operation does something at full magnitude


def test_rand_augment_draws_operation_and_sign_per_image():
    x = images(64, seed=1)
    got = rand_augment(x, 2, 9, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    want = x.clone()
    ops_seen = set()
    for _ in range(2):
        op = torch.randint(len(NAMES), (64,), generator=g)
        neg = torch.rand(64, generator=g) < 0.5
        ops_seen |= set(op.tolist())
        want = torch.stack([apply_op(w[None], NAMES[k], 9, bool(n))[0] for w, k, n in zip(want, op, neg)])
    assert torch.equal(got, want)
    assert len(ops_seen) >= 12  # 128 draws: every image its own operation, not one per batch
    assert torch.equal(x, images(64, seed=1))  # the input batch is not modified


def _erased(x: torch.Tensor) -> torch.Tensor:
    return (x == 0).all(1)  # (B, H, W): pixels set to 0 in every channel


def test_random_erasing_erases_one_rectangle_with_torchvisions_distribution():
    n, p = 4000, 0.6
    x = torch.ones(n, 3, 32, 32)
    out = random_erasing(x, p, torch.Generator().manual_seed(0))
    mask = _erased(out)
    hit = mask.flatten(1).any(1)
    assert abs(hit.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    for m in mask[hit][:200]:  # each erased region is one full rectangle
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert m.sum() == len(rows) * len(cols)
        assert rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols)
    assert torch.equal(out[~hit], x[~hit])
    # The erased area and shape, against torchvision's RandomErasing image by image.
    torch.manual_seed(0)
    tv = v2.RandomErasing(p=1.0, value=0)
    ref = torch.cat([_erased(tv(img)[None]) for img in x[:n]])
    ours = _erased(random_erasing(x, 1.0, torch.Generator().manual_seed(1)))
    for stat in (
        lambda m: m.flatten(1).float().mean(1),
        lambda m: m.any(2).float().sum(1) / m.any(1).float().sum(1).clamp(min=1),
    ):
        a, b = stat(ours), stat(ref)
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean())


def test_mixup_mixes_images_and_targets_with_one_lambda():
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    mixed, hard, target = mix_batch(x, y, 10, mixup=0.8, cutmix=0.0, generator=torch.Generator().manual_seed(3))
    lam = target[0, 0].item()
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    want = lam * F.one_hot(y, 10).float() + (1 - lam) * F.one_hot(y.flip(0), 10).float()
    assert torch.allclose(target, want)
    assert torch.equal(hard, y if lam >= 0.5 else y.flip(0))


def test_cutmix_pastes_a_box_and_its_lambda_is_the_kept_share():
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8)
    seen = set()
    for seed in range(20):
        mixed, hard, target = mix_batch(x, y, 10, mixup=0.0, cutmix=1.0, generator=torch.Generator().manual_seed(seed))
        kept = (mixed == x).all(1)  # (B, H, W)
        pasted = (mixed == x.flip(0)).all(1)
        assert (kept ^ pasted).all()  # every pixel from one of the two images
        lam = kept[0].float().mean().item()
        assert target[0, 0].item() == pytest.approx(lam, abs=1e-6)
        assert target[0, 7].item() == pytest.approx(1 - lam, abs=1e-6)
        box = pasted[0]
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert box.sum() == len(rows) * len(cols)  # a rectangle
        seen.add(round(lam, 3))
    assert len(seen) > 10


def test_both_alphas_switch_between_mixup_and_cutmix_per_batch():
    x = torch.randn(4, 3, 32, 32)
    y = torch.arange(4)
    kinds = []
    for seed in range(200):
        mixed, _, _ = mix_batch(x, y, 10, mixup=0.8, cutmix=1.0, generator=torch.Generator().manual_seed(seed))
        kinds.append(bool(((mixed == x).all(1) | (mixed == x.flip(0)).all(1)).all()))  # CutMix: pixels copied
    assert 70 < sum(kinds) < 130


def test_training_loss_is_taken_against_the_soft_targets():
    model = ResNetClassifier(arch="resnet8", num_classes=10, label_smoothing=0.1, channels_last=False)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    mixed, hard, target = mix_batch(x, y, 10, mixup=1.0, cutmix=0.0, generator=torch.Generator().manual_seed(0))
    lam = target[0, 0].item()
    loss, logits = model._step("train", (mixed, hard, target))
    want = lam * F.cross_entropy(logits, y, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(
        logits, y.flip(0), label_smoothing=0.1
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert abs(loss.item() - F.cross_entropy(logits, hard, label_smoothing=0.1).item()) > 1e-3


RECIPE = [
    "--data.init_args.randaugment",
    "2",
    "--data.init_args.erasing",
    "0.25",
    "--data.init_args.mixup",
    "0.8",
    "--data.init_args.cutmix",
    "1.0",
]


@pytest.mark.slow
def test_a_fit_with_the_recipe_augments_and_a_resume_repeats_it(tmp_path):
    def run(root, steps, *extra):
        rec = Batches()
        args = fit_args(root, "--model.depth", "8", "--data.init_args.batch_size", "64", *RECIPE)
        cli = cli_main(
            [*args, "--trainer.max_steps", str(steps), "--run.checkpoint_every_n_steps", "3", *extra],
            extra_callbacks=[rec],
        )
        return rec, cli

    straight, cli = run(tmp_path / "a", 6)
    plain, _ = run(
        tmp_path / "b",
        1,
        "--data.init_args.randaugment",
        "0",
        "--data.init_args.erasing",
        "0",
        "--data.init_args.mixup",
        "0",
        "--data.init_args.cutmix",
        "0",
    )
    assert sorted(straight.seen[0][0]) == sorted(plain.seen[0][0])  # the same images...
    assert straight.seen[0][1] != plain.seen[0][1]  # ...but other pixels
    assert (
        len(cli.datamodule.on_after_batch_transfer((torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.arange(2)), 0))
        == 2
    )
    run(tmp_path / "c", 3)
    part = next((tmp_path / "c").glob("runs/*/*/checkpoints/last.ckpt"))
    resumed, _ = run(tmp_path / "c", 6, "--ckpt_path", str(part))
    for step in range(3, 6):
        assert resumed.seen[step] == straight.seen[step], step


@pytest.mark.parametrize(
    "args",
    [
        (-1, 9, 0.0, 0.0, 0.0),
        (2, 31, 0.0, 0.0, 0.0),
        (2, 9, 1.5, 0.0, 0.0),
        (2, 9, 0.0, -0.2, 0.0),
        (2, 9, 0.0, 0.0, float("inf")),
    ],
)
def test_bad_augmentation_options_name_the_fix(args):
    with pytest.raises(DataError, match="data.init_args"):
        check_options(*args)


@pytest.mark.parametrize("flag", ["mixup", "randaugment", "erasing"])
def test_bad_augmentation_option_on_the_cli_is_one_line_exit_2(tmp_path, capsys, flag):
    from resnet_lab.cli import main

    assert main(fit_args(tmp_path, "--model.depth", "8", f"--data.init_args.{flag}", "-1")) == 2
    one_message(capsys, f"data.init_args.{flag}=-1")
    assert not (tmp_path / "runs").exists()
