"""The typed architecture spec: the single source of truth for a network.

A `ResNetSpec` is what the LightningModule receives and what a checkpoint stores
(as a plain dict under `hyper_parameters["spec"]`), so a checkpoint alone rebuilds
the exact network. Everything a depth/shortcut ablation varies is a field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UserError

Family = Literal["cifar", "imagenet"]
Shortcut = Literal["A", "B", "C"]
StrideOn = Literal["3x3", "1x1"]

SHORTCUTS: tuple[str, ...] = ("A", "B", "C")
STRIDE_ON: tuple[str, ...] = ("3x3", "1x1")
FAMILIES: tuple[str, ...] = ("cifar", "imagenet")

# ImageNet depths -> (block type, blocks per stage). He et al. Table 1, plus the
# two extra depths timm also ships (26 and 200) since they follow the same rule.
IMAGENET_LAYOUTS: dict[int, tuple[str, tuple[int, ...]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


class SpecError(UserError, ValueError):
    """An impossible architecture; the message names the valid choices."""


@dataclass(frozen=True)
class ResNetSpec:
    """Everything needed to build one network of He et al. 2015.

    family: "cifar" (depth 6n+2, widths 16/32/64, 3x3 stem) or "imagenet"
        (7x7/2 stem + 3x3/2 max-pool, depths in IMAGENET_LAYOUTS).
    depth: number of weighted layers, as the paper counts them.
    num_classes: width of the linear head.
    shortcut: "A" parameter-free (identity, or stride-2 subsample + zero-padded
        channels where shapes change), "B" 1x1 projection only where shapes change,
        "C" projection on every block. Ignored by plain nets, which have none.
    plain: drop every shortcut ("plain-N" of the paper). The parameter count is
        then identical to the option-A residual net of the same depth.
    stride_on: bottleneck only; "3x3" is torchvision v1.5, "1x1" is the original
        Caffe v1 (stride on the first 1x1), which loses 3/4 of the input.
    zero_init_residual: zero the last BN gamma of every residual branch. Off by
        default: it makes every block start as identity, which confounds depth and
        lesion studies (a fresh net is already "robust" to removal).
    base_width: channels of the first stage (16 CIFAR, 64 ImageNet).
    in_chans: input channels.
    """

    family: Family = "cifar"
    depth: int = 20
    num_classes: int = 10
    shortcut: Shortcut = "A"
    plain: bool = False
    stride_on: StrideOn = "3x3"
    zero_init_residual: bool = False
    base_width: int | None = None
    in_chans: int = 3

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SpecError(f"unknown family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.shortcut not in SHORTCUTS:
            raise SpecError(
                f"unknown shortcut option {self.shortcut!r}; valid: 'A' (zero-pad), "
                "'B' (projection where shapes change), 'C' (projection everywhere)"
            )
        if self.stride_on not in STRIDE_ON:
            raise SpecError(f"unknown stride_on {self.stride_on!r}; valid: {', '.join(STRIDE_ON)}")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool):
            raise SpecError(f"depth must be an int, got {self.depth!r}")
        if self.family == "cifar":
            if self.depth < 8 or (self.depth - 2) % 6:
                lo = max(8, self.depth - (self.depth - 2) % 6)
                raise SpecError(
                    f"CIFAR depth must be 6n+2 with n>=1 (8, 14, 20, 32, 44, 56, 110, 1202, ...); "
                    f"got {self.depth} (nearest valid: {lo} or {lo + 6})"
                )
        elif self.depth not in IMAGENET_LAYOUTS:
            raise SpecError(f"ImageNet depth must be one of {sorted(IMAGENET_LAYOUTS)}; got {self.depth}")
        if self.num_classes < 1:
            raise SpecError(f"num_classes must be >= 1, got {self.num_classes}")

    # Derived layout ---------------------------------------------------------
    @property
    def block(self) -> str:
        """'basic' or 'bottleneck'."""
        return "basic" if self.family == "cifar" else IMAGENET_LAYOUTS[self.depth][0]

    @property
    def layers(self) -> tuple[int, ...]:
        """Blocks per stage."""
        if self.family == "cifar":
            n = (self.depth - 2) // 6
            return (n, n, n)
        return IMAGENET_LAYOUTS[self.depth][1]

    @property
    def width(self) -> int:
        return self.base_width or (16 if self.family == "cifar" else 64)

    @property
    def name(self) -> str:
        """Registry-style name, e.g. 'resnet56' or 'plain20'. A CIFAR net whose depth is
        also an ImageNet depth (26, 50, 152, 200) is 'cifar_resnet50': run names and
        report labels never confuse it with the ImageNet net."""
        base = f"{'plain' if self.plain else 'resnet'}{self.depth}"
        return f"cifar_{base}" if self.family == "cifar" and self.depth in IMAGENET_LAYOUTS else base

    @property
    def input_size(self) -> int:
        """Native input resolution (pixels)."""
        return 32 if self.family == "cifar" else 224

    def replace(self, **overrides: Any) -> ResNetSpec:
        """A copy with `overrides` applied; `None` values are ignored, so CLI defaults
        never clobber registry defaults."""
        kw = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise SpecError(f"unknown spec field(s) {sorted(unknown)}; valid: {valid}")
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResNetSpec:
        return cls(**d)
