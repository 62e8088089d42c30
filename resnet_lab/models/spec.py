"""The typed architecture spec: the single source of truth for a network.

A `ResNetSpec` is what the LightningModule receives and what a checkpoint stores
(as a plain dict under `hyper_parameters["spec"]`), so a checkpoint alone rebuilds
the exact network. Everything a depth/shortcut ablation varies is a field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..errors import UserError

Family = Literal["cifar", "imagenet"]
Shortcut = Literal["A", "B", "C"]
StrideOn = Literal["3x3", "1x1"]
BlockType = Literal["basic", "bottleneck"]
DropMode = Literal["batch", "sample"]

SHORTCUTS: tuple[str, ...] = ("A", "B", "C")
STRIDE_ON: tuple[str, ...] = ("3x3", "1x1")
FAMILIES: tuple[str, ...] = ("cifar", "imagenet")
BLOCK_TYPES: tuple[str, ...] = ("basic", "bottleneck")
DROP_MODES: tuple[str, ...] = ("batch", "sample")
DEFAULT_SURVIVAL = 0.5  # Huang et al.'s p_L
# CIFAR depths that the literature (He et al. 2016) names for bottleneck nets: "ResNet-164"
# and "ResNet-1001" are 9n+2 bottleneck nets, although 164 is also a valid 6n+2 basic depth.
# Names keep both readable and unambiguous: preact_resnet164 is the bottleneck net, the
# basic one is preact_resnet164_basic; a bottleneck net at any other depth is *_bottleneck.
CIFAR_BOTTLENECK_NAMES: tuple[int, ...] = (164, 1001)

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


# Every family's `family` values: a checkpoint's spec dict is read back by the class of its family.
ALL_FAMILIES = "cifar, imagenet (ResNets), vit, convnext"


def check_positive(**values: Any) -> None:
    """Refuse a count or size that is not a positive int, naming the field."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SpecError(f"{name}={v!r} must be a positive integer")


class SpecBase:
    """What every family's spec offers: overrides, and the dict a checkpoint stores."""

    # The fields that make a net deeper, and those its plain twin changes (comparisons of
    # deep - shallow and plain - residual hold every other field equal).
    DEPTH_FIELDS: ClassVar[tuple[str, ...]] = ("depth",)
    PLAIN_FIELDS: ClassVar[tuple[str, ...]] = ("plain",)
    # Whether the family's nets normalise with BatchNorm (running statistics that can be
    # re-estimated); each family says so.
    BATCHNORM: ClassVar[bool]

    def replace(self, **overrides: Any) -> Any:
        """A copy with `overrides` applied; `None` values are ignored, so CLI defaults
        never clobber registry defaults. A field of another family is refused by name."""
        kw = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self) if f.name != "family")
            raise SpecError(f"{self.name} has no option(s) {', '.join(sorted(unknown))}; its options: {valid}")
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ResNetSpec(SpecBase):
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
    preact: pre-activation blocks (He et al. 2016, "Identity Mappings"): BN -> ReLU ->
        conv inside the branch, nothing after the addition, one BN -> ReLU before the
        pool. A removed pre-activation block is y = x exactly.
    block_type: CIFAR only: "basic" (depth 6n+2, the default) or "bottleneck" (depth
        9n+2, widths 16/32/64 x4: ResNet-164 and -1001 of He et al. 2016). None keeps
        the family's default; ImageNet depths fix it (Table 1).
    stochastic_depth: None (off), "batch" (Huang et al. 2016: each block's branch is
        dropped for the whole batch) or "sample" (per sample, timm's drop_path). Block
        l of L survives with p_l = 1 - l/L (1 - survival_last) (Huang's linear rule);
        at test time the branch is scaled by p_l (used in expectation).
    survival_last: p_L, the survival probability of the last block (Huang: 0.5).
    active_blocks: Veit et al.'s "train on short paths": exactly this many random
        blocks keep their branch in each training batch (the rest pass their input
        through the skip); at test time every branch is scaled by active_blocks / L.
    """

    BATCHNORM: ClassVar[bool] = True

    family: Family = "cifar"
    depth: int = 20
    num_classes: int = 10
    shortcut: Shortcut = "A"
    plain: bool = False
    stride_on: StrideOn = "3x3"
    zero_init_residual: bool = False
    base_width: int | None = None
    in_chans: int = 3
    preact: bool = False
    block_type: BlockType | None = None
    stochastic_depth: DropMode | None = None
    survival_last: float = DEFAULT_SURVIVAL
    active_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SpecError(f"unknown family {self.family!r}; valid: {ALL_FAMILIES}")
        if self.shortcut not in SHORTCUTS:
            raise SpecError(
                f"unknown shortcut option {self.shortcut!r}; valid: 'A' (zero-pad), "
                "'B' (projection where shapes change), 'C' (projection everywhere)"
            )
        if self.stride_on not in STRIDE_ON:
            raise SpecError(f"unknown stride_on {self.stride_on!r}; valid: {', '.join(STRIDE_ON)}")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool):
            raise SpecError(f"depth must be an int, got {self.depth!r}")
        if self.block_type is not None and self.block_type not in BLOCK_TYPES:
            raise SpecError(f"unknown block_type {self.block_type!r}; valid: {', '.join(BLOCK_TYPES)} (or null)")
        if self.family == "cifar":
            per, ex = (9, "11, 20, 56, 110, 164, 1001") if self.block == "bottleneck" else (6, "8, 20, 56, 110, 1202")
            if self.depth < per + 2 or (self.depth - 2) % per:
                lo = max(per + 2, self.depth - (self.depth - 2) % per)
                raise SpecError(
                    f"CIFAR depth must be {per}n+2 with n>=1 for {self.block} blocks ({ex}, ...); "
                    f"got {self.depth} (nearest valid: {lo} or {lo + per})"
                )
        elif self.depth not in IMAGENET_LAYOUTS:
            raise SpecError(f"ImageNet depth must be one of {sorted(IMAGENET_LAYOUTS)}; got {self.depth}")
        elif self.block_type not in (None, IMAGENET_LAYOUTS[self.depth][0]):
            raise SpecError(
                f"ImageNet depth {self.depth} uses {IMAGENET_LAYOUTS[self.depth][0]} blocks (Table 1); "
                f"block_type={self.block_type!r} applies to CIFAR nets only (leave it null)"
            )
        if self.num_classes < 1:
            raise SpecError(f"num_classes must be >= 1, got {self.num_classes}")
        self._check_drops()
        self._check_effective()

    def _check_effective(self) -> None:
        """Refuse values the network would not implement: the spec is what a checkpoint
        rebuilds and what reports name, so it never holds a setting that did nothing."""
        for name, v in (("base_width", self.base_width), ("in_chans", self.in_chans)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise SpecError(
                    f"{name}={v!r} must be a positive integer"
                    + (" (or null for the default)" if name == "base_width" else "")
                )
        if self.stride_on != "3x3" and self.block != "bottleneck":
            raise SpecError(
                f"stride_on={self.stride_on!r} places the stride inside a bottleneck; {self.name} has basic blocks. "
                "Drop stride_on (or use a bottleneck net)"
            )
        if self.plain and self.shortcut != "A":
            raise SpecError(
                f"a plain net has no shortcuts, so shortcut={self.shortcut!r} would do nothing; drop the shortcut "
                "option (or set plain to false)"
            )
        if self.plain and self.zero_init_residual:
            raise SpecError("zero_init_residual needs shortcuts: a plain net would output zeros")
        if self.stochastic_depth is None and self.survival_last != DEFAULT_SURVIVAL:
            raise SpecError(
                f"survival_last={self.survival_last} applies only with stochastic_depth (batch or sample); "
                "set stochastic_depth too, or drop survival_last"
            )

    def _check_drops(self) -> None:
        sd, k = self.stochastic_depth, self.active_blocks
        if sd is not None and sd not in DROP_MODES:
            raise SpecError(f"unknown stochastic_depth {sd!r}; valid: {', '.join(DROP_MODES)} (or null for off)")
        if not 0.0 < self.survival_last <= 1.0:
            raise SpecError(f"survival_last must be in (0, 1], got {self.survival_last}")
        if k is not None and (isinstance(k, bool) or not 1 <= k <= self.num_blocks):
            raise SpecError(f"active_blocks must be an int in 1..{self.num_blocks} (the net's blocks), got {k!r}")
        if (sd is not None or k is not None) and self.plain:
            raise SpecError("stochastic depth and active_blocks drop residual branches; a plain net has no skip")
        if sd is not None and k is not None:
            raise SpecError("set either stochastic_depth (random drops) or active_blocks (a fixed count), not both")

    # Derived layout ---------------------------------------------------------
    @property
    def block(self) -> str:
        """'basic' or 'bottleneck'."""
        if self.family == "cifar":
            return self.block_type or "basic"
        return IMAGENET_LAYOUTS[self.depth][0]

    @property
    def layers(self) -> tuple[int, ...]:
        """Blocks per stage."""
        if self.family == "cifar":
            n = (self.depth - 2) // (9 if self.block == "bottleneck" else 6)
            return (n, n, n)
        return IMAGENET_LAYOUTS[self.depth][1]

    @property
    def num_blocks(self) -> int:
        return sum(self.layers)

    def survival_probs(self) -> tuple[float, ...]:
        """Per block, in forward order, the probability that its residual branch is
        used in a training batch; also its scale at test time (1.0 = no drops)."""
        n = self.num_blocks
        if self.active_blocks is not None:
            return (self.active_blocks / n,) * n
        if self.stochastic_depth is None:
            return (1.0,) * n
        return tuple(1.0 - (i / n) * (1.0 - self.survival_last) for i in range(1, n + 1))

    @property
    def width(self) -> int:
        return self.base_width or (16 if self.family == "cifar" else 64)

    @property
    def name(self) -> str:
        """Registry-style name, e.g. 'resnet56' or 'plain20'. A CIFAR net whose depth is
        also an ImageNet depth (26, 50, 152, 200) is 'cifar_resnet50': run names and
        report labels never confuse it with the ImageNet net."""
        base = f"{'plain' if self.plain else 'resnet'}{self.depth}"
        if self.family == "cifar":
            if self.block == "bottleneck" and self.depth not in CIFAR_BOTTLENECK_NAMES:
                base += "_bottleneck"
            elif self.block == "basic" and self.depth in CIFAR_BOTTLENECK_NAMES:
                base += "_basic"
        if self.preact:
            base = "preact_" + base
        if self.stochastic_depth is not None:
            base += f"_sd{self.survival_last:g}" + ("" if self.stochastic_depth == "batch" else "s")
        if self.active_blocks is not None:
            base += f"_active{self.active_blocks}"
        return f"cifar_{base}" if self.family == "cifar" and self.depth in IMAGENET_LAYOUTS else base

    @property
    def input_size(self) -> int:
        """Native input resolution (pixels)."""
        return 32 if self.family == "cifar" else 224

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResNetSpec:
        """The spec a checkpoint stores. Checkpoints written before a field existed rebuild
        with its default; settings that older versions accepted but never implemented
        (a plain net's shortcut, survival_last without stochastic depth, base_width 0,
        stride_on of basic blocks) are read as what the network really was."""
        d = dict(d)
        if d.get("plain"):
            d["shortcut"] = "A"
        if d.get("stochastic_depth") is None:
            d["survival_last"] = DEFAULT_SURVIVAL
        if d.get("base_width") == 0:
            d["base_width"] = None
        if d.get("stride_on") not in (None, "3x3") and not _is_bottleneck(d):
            d["stride_on"] = "3x3"
        return cls(**d)


def _is_bottleneck(d: dict[str, Any]) -> bool:
    if d.get("family", "cifar") == "cifar":
        return d.get("block_type") == "bottleneck"
    return IMAGENET_LAYOUTS.get(d.get("depth"), ("basic",))[0] == "bottleneck"
