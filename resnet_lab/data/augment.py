"""The augmentation of the transformer-era recipes (DeiT, Touvron et al. 2021; ConvNeXt, Liu
et al. 2022), batched and seeded like `cifar.random_crop_flip`:

- RandAugment (Cubuk et al. 2020): `num_ops` operations per image, each drawn per image from
  torchvision's 14 (identity, shears, translations, rotation, brightness, colour, contrast,
  sharpness, posterize, solarize, autocontrast, equalize) at torchvision's magnitudes (31 bins;
  a signed operation's sign drawn per image). Operations run on uint8 images, grouped by
  (operation, sign), through torchvision's own functional ops: the same pixels as
  `torchvision.transforms.v2.RandAugment` applying that operation to each image alone.
- Random erasing (Zhong et al. 2020): with probability p, a rectangle of 2-33% of the image
  with aspect ratio in [0.3, 3.3] (log-uniform) set to 0, the mean colour of mean-subtracted
  images (torchvision's `RandomErasing` value=0; 10 attempts to fit, else none).
- Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019), timm's batch mode: every batch is mixed
  with itself reversed, with one λ ~ Beta(α, α); with both α > 0, CutMix on half of the batches
  (timm's switch_prob 0.5); CutMix's λ is the kept share of the image after the box is clipped.

Every draw comes from the generator passed in, so a resumed run repeats its augmentation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .common import DataError

BINS = 31  # torchvision's num_magnitude_bins


def _magnitude(name: str, m: int, height: int, width: int) -> float | None:
    """torchvision's RandAugment magnitude of operation `name` at bin m of 31."""
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width, "TranslateY": 150.0 / 331.0 * height}
    top |= {"Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
    if name in top:
        return float(torch.linspace(0.0, top[name], BINS)[m])
    if name == "Posterize":
        return float(8 - (torch.arange(BINS) / ((BINS - 1) / 4)).round().int()[m])
    if name == "Solarize":
        return float(torch.linspace(1.0, 0.0, BINS)[m])
    return None


def _shear(x: Tensor, sx: float, sy: float) -> Tensor:
    shear = [math.degrees(math.atan(sx)), math.degrees(math.atan(sy))]
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])


def _translate(x: Tensor, dx: float, dy: float) -> Tensor:
    return TF.affine(x, angle=0.0, translate=[int(dx), int(dy)], scale=1.0, shear=[0.0, 0.0])


OPS = {  # name: (apply(images, magnitude), signed)
    "Identity": (lambda x, m: x, False),
    "ShearX": (lambda x, m: _shear(x, m, 0.0), True),
    "ShearY": (lambda x, m: _shear(x, 0.0, m), True),
    "TranslateX": (lambda x, m: _translate(x, m, 0.0), True),
    "TranslateY": (lambda x, m: _translate(x, 0.0, m), True),
    "Rotate": (lambda x, m: TF.rotate(x, angle=m), True),
    "Brightness": (lambda x, m: TF.adjust_brightness(x, 1.0 + m), True),
    "Color": (lambda x, m: TF.adjust_saturation(x, 1.0 + m), True),
    "Contrast": (lambda x, m: TF.adjust_contrast(x, 1.0 + m), True),
    "Sharpness": (lambda x, m: TF.adjust_sharpness(x, 1.0 + m), True),
    "Posterize": (lambda x, m: TF.posterize(x, bits=int(m)), False),
    "Solarize": (lambda x, m: TF.solarize(x, threshold=255.0 * m), False),
    "AutoContrast": (lambda x, m: TF.autocontrast(x), False),
    "Equalize": (lambda x, m: TF.equalize(x), False),
}
NAMES = list(OPS)


def apply_op(x: Tensor, name: str, magnitude_bin: int, negative: bool = False) -> Tensor:
    """One RandAugment operation at one magnitude bin on a batch of uint8 images."""
    fn, signed = OPS[name]
    m = _magnitude(name, magnitude_bin, x.shape[-2], x.shape[-1])
    m = 0.0 if m is None else (-m if signed and negative else m)
    return fn(x, m)


def rand_augment(x: Tensor, num_ops: int, magnitude: int, generator: torch.Generator) -> Tensor:
    """RandAugment of a (B, C, H, W) uint8 batch, drawn per image."""
    b = len(x)
    out = x.clone()
    for _ in range(num_ops):
        op = torch.randint(len(NAMES), (b,), device=x.device, generator=generator)
        negative = torch.rand(b, device=x.device, generator=generator) < 0.5
        for k, name in enumerate(NAMES):
            for neg in (False, True) if OPS[name][1] else (None,):
                sel = op == k if neg is None else (op == k) & (negative == neg)
                idx = sel.nonzero().flatten()
                if len(idx) and name != "Identity":
                    out[idx] = apply_op(out[idx], name, magnitude, bool(neg))
    return out


def random_erasing(
    x: Tensor,
    p: float,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    attempts: int = 10,
) -> Tensor:
    """Erase (set to 0) one random rectangle of each image with probability p."""
    b, _, h, w = x.shape
    dev = x.device
    area = torch.empty(b, attempts, device=dev).uniform_(*scale, generator=generator) * (h * w)
    log_r = torch.empty(b, attempts, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    eh = (area * log_r.exp()).sqrt().round().long()
    ew = (area / log_r.exp()).sqrt().round().long()
    fits = (eh < h) & (ew < w)
    first = fits.long().argmax(1, keepdim=True)  # the first attempt that fits
    eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
    erase = (torch.rand(b, device=dev, generator=generator) < p) & fits.any(1)
    top = (torch.rand(b, device=dev, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(b, device=dev, generator=generator) * (w - ew + 1)).long()
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B, W)
    mask = erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(mask[:, None], 0.0)


def _beta(alpha: float, generator: torch.Generator) -> float:
    seed = int(torch.randint(2**62, (), device=generator.device, generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def cut_box(lam: float, h: int, w: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """CutMix's box (top, bottom, left, right) of about (1 − λ) of the image, centred at a
    uniform pixel and clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (), device=generator.device, generator=generator))
    cx = int(torch.randint(w, (), device=generator.device, generator=generator))
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def mix_batch(
    x: Tensor, y: Tensor, num_classes: int, mixup: float, cutmix: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Mixup or CutMix of a batch with itself reversed.

    Returns the mixed images, the label of larger weight (what the training error counts) and
    the soft targets λ·onehot(y) + (1 − λ)·onehot(y reversed) that the loss is taken against."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand((), device=generator.device, generator=generator) < 0.5))
    lam = _beta(cutmix if use_cutmix else mixup, generator)
    partner = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        top, bottom, left, right = cut_box(lam, h, w, generator)
        x = x.clone()
        x[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    else:
        x = x * lam + partner * (1.0 - lam)
    other = y.flip(0)
    target = F.one_hot(y, num_classes).float() * lam + F.one_hot(other, num_classes).float() * (1.0 - lam)
    return x, (y if lam >= 0.5 else other), target


def check_options(randaugment: int, magnitude: int, erasing: float, mixup: float, cutmix: float) -> None:
    """One line naming the fix for a bad augmentation option (DataError: exit 2)."""
    if not isinstance(randaugment, int) or isinstance(randaugment, bool) or randaugment < 0:
        raise DataError(f"data.init_args.randaugment={randaugment!r} must be an integer >= 0 (ops per image; 0 = off)")
    if not isinstance(magnitude, int) or isinstance(magnitude, bool) or not 0 <= magnitude < BINS:
        raise DataError(f"data.init_args.randaugment_magnitude={magnitude!r} must be an integer in 0..{BINS - 1}")
    if not (isinstance(erasing, int | float) and 0 <= erasing <= 1):
        raise DataError(f"data.init_args.erasing={erasing!r} must be a probability in [0, 1]")
    for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
            raise DataError(f"data.init_args.{name}={alpha!r} must be a Beta parameter alpha >= 0 (0 = off)")
