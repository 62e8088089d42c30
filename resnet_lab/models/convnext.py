"""ConvNeXts (Liu et al. 2022) in torchvision's layout, with unit surgery.

  patchify stem (conv k x k / k + LayerNorm) -> 4 stages of blocks, a downsampling layer
  (LayerNorm + conv 2x2/2) between stages -> global average pool -> LayerNorm -> linear

A block is one residual update and one unit (`stage{s}.{b}`, s = 1..4):
  x + gamma * Linear(GELU(Linear(LN(dwconv7x7(x))))), gamma the per-channel layer scale.
The downsampling layers are not residual and never removable (like a ResNet's
projection, they are the only path); they run after the last unit of their stage, so
`forward_until(x, i)` is always the input of unit i.

Stems: "imagenet" is torchvision's 4x4/4 (224 px -> 56); "cifar" is 2x2/2 (32 px -> 16,
then 8, 4, 2). A plain ConvNeXt (`plain=True`) drops the additions; its layer scale
must then be 1 (gamma = 1e-6 would scale the whole signal down by 1e-6 per block).

Module names match torchvision (`features.0.0`, `features.1.0.block.0`,
`features.1.0.layer_scale`, `features.2.1`, `classifier.2`), so torchvision's
`convnext_tiny` state dict loads into `convnext_tiny` as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchvision.ops import Permute, StochasticDepth
from torchvision.ops.misc import Conv2dNormActivation

from .spec import SpecBase, SpecError, check_positive
from .surgery import StreamUpdate, UnitNet

STEMS = {"cifar": 2, "imagenet": 4}  # patchify kernel = stride
# name: (stem, blocks per stage, widths, torchvision's drop-path rate)
CONVNEXT_PRESETS: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], float]] = {
    "convnext_tiny": ("imagenet", (3, 3, 9, 3), (96, 192, 384, 768), 0.1),
    "convnext_small": ("imagenet", (3, 3, 27, 3), (96, 192, 384, 768), 0.4),
    "convnext_base": ("imagenet", (3, 3, 27, 3), (128, 256, 512, 1024), 0.5),
    "convnext_large": ("imagenet", (3, 3, 27, 3), (192, 384, 768, 1536), 0.5),
    # timm's atto widths at CIFAR size: ~3.4M parameters, ResNet-20's MACs.
    "cifar_convnext_atto": ("cifar", (2, 2, 6, 2), (40, 80, 160, 320), 0.0),
}
DEFAULT_LAYER_SCALE = 1e-6
_TAIL = r"(?:_ls(?P<ls>[0-9.e-]+))?(?:_dp(?P<dp>[0-9.]+))?"
_PRESET = re.compile(r"(?P<plain>plain_)?(?P<preset>(?:cifar_)?convnext_[a-z]+)" + _TAIL)
_CANONICAL = re.compile(r"(?P<plain>plain_)?convnext_(?P<stem>cifar|imagenet)_d(?P<d>[\d-]+)_w(?P<w>[\d-]+)" + _TAIL)


@dataclass(frozen=True)
class ConvNeXtSpec(SpecBase):
    """Everything needed to build one ConvNeXt.

    stage_depths: blocks per stage; widths: channels per stage (as many as stages).
    stem: "cifar" (2x2/2 patchify) or "imagenet" (4x4/4, torchvision).
    layer_scale: the initial per-channel scale of every block's output (Touvron et al.
        2021; 1e-6 in the paper); 1.0 for a plain net.
    drop_path: stochastic depth, the largest rate, at the last block; block i of N
        drops with drop_path * i / (N - 1) (torchvision's rule). 0 = off.
    plain: no residual additions.
    """

    DEPTH_FIELDS: ClassVar[tuple[str, ...]] = ("stage_depths",)
    # A plain ConvNeXt must have layer scale 1 and no drop path: its twin differs there too.
    PLAIN_FIELDS: ClassVar[tuple[str, ...]] = ("plain", "layer_scale", "drop_path")
    BATCHNORM: ClassVar[bool] = False  # LayerNorm

    family: Literal["convnext"] = "convnext"
    stage_depths: tuple[int, ...] = CONVNEXT_PRESETS["cifar_convnext_atto"][1]
    widths: tuple[int, ...] = CONVNEXT_PRESETS["cifar_convnext_atto"][2]
    stem: str = "cifar"
    layer_scale: float = DEFAULT_LAYER_SCALE
    drop_path: float = 0.0
    num_classes: int = 10
    plain: bool = False
    in_chans: int = 3

    def __post_init__(self) -> None:
        for f in ("stage_depths", "widths"):
            v = getattr(self, f)
            if not isinstance(v, list | tuple) or not v:
                raise SpecError(f"{f}={v!r} must be a non-empty list of positive integers, e.g. [2, 2, 6, 2]")
            check_positive(**{f"{f}[{i}]": x for i, x in enumerate(v)})
            object.__setattr__(self, f, tuple(v))
        if len(self.widths) != len(self.stage_depths):
            raise SpecError(
                f"widths has {len(self.widths)} entries but stage_depths {len(self.stage_depths)}: "
                "give one width per stage"
            )
        if self.stem not in STEMS:
            raise SpecError(f"unknown stem {self.stem!r}; valid: {', '.join(STEMS)}")
        check_positive(num_classes=self.num_classes, in_chans=self.in_chans)
        if not (isinstance(self.layer_scale, int | float) and 0 < self.layer_scale <= 1):
            raise SpecError(f"layer_scale={self.layer_scale!r} must be in (0, 1]; the paper's is 1e-6")
        if not (isinstance(self.drop_path, int | float) and 0 <= self.drop_path < 1):
            raise SpecError(f"drop_path={self.drop_path!r} must be in [0, 1), e.g. 0.1")
        if self.plain and self.layer_scale != 1:
            raise SpecError(
                f"a plain ConvNeXt with layer_scale={self.layer_scale:g} scales the whole signal by that much per "
                "block (there is no skip to carry it); set layer_scale to 1.0"
            )
        if self.plain and self.drop_path:
            raise SpecError("drop_path drops residual branches; a plain net has no skip. Set drop_path to 0")

    @property
    def num_blocks(self) -> int:
        return sum(self.stage_depths)

    @property
    def depth(self) -> int:
        """The number of blocks, what depth comparisons order ConvNeXts by (stage_depths
        is the option that sets it)."""
        return self.num_blocks

    @property
    def block(self) -> str:
        return "dwconv7+MLP"

    @property
    def input_size(self) -> int:
        return 32 if self.stem == "cifar" else 224

    @property
    def name(self) -> str:
        """`cifar_convnext_atto`, `convnext_tiny`, `plain_cifar_convnext_atto`, or for other
        layouts `convnext_cifar_d1-1-3-1_w40-80-160-320`; `_lsX` / `_dpX` when the layer
        scale or the drop-path rate differ from the default (1e-6, 1 for a plain net; the
        preset's rate, 0 elsewhere and for a plain net). Each resolves back."""
        plain = "plain_" if self.plain else ""
        for preset, (stem, depths, widths, dp) in CONVNEXT_PRESETS.items():
            if (stem, depths, widths) == (self.stem, self.stage_depths, self.widths):
                return plain + preset + self._tail(dp)
        d, w = "-".join(map(str, self.stage_depths)), "-".join(map(str, self.widths))
        return f"{plain}convnext_{self.stem}_d{d}_w{w}" + self._tail(0.0)

    def _tail(self, default_dp: float) -> str:
        ls = "" if self.layer_scale == (1.0 if self.plain else DEFAULT_LAYER_SCALE) else f"_ls{self.layer_scale:g}"
        default_dp = 0.0 if self.plain else default_dp  # a plain net has no drop path
        return ls + ("" if self.drop_path == default_dp else f"_dp{self.drop_path:g}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {**d, "stage_depths": list(self.stage_depths), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvNeXtSpec:
        return cls(**d)


def parse_convnext_name(name: str) -> tuple[ConvNeXtSpec, dict[str, Any]] | None:
    """(spec, the fields the name states) for any name `ConvNeXtSpec.name` writes."""
    if (m := _PRESET.fullmatch(name)) and m["preset"] in CONVNEXT_PRESETS:
        stem, depths, widths, dp = CONVNEXT_PRESETS[m["preset"]]
    elif m := _CANONICAL.fullmatch(name):
        stem, dp = m["stem"], 0.0
        depths, widths = (tuple(int(x) for x in m[k].split("-") if x) for k in ("d", "w"))
    else:
        return None
    plain = bool(m["plain"])
    ls = float(m["ls"]) if m["ls"] else (1.0 if plain else DEFAULT_LAYER_SCALE)
    spec = ConvNeXtSpec(stage_depths=depths, widths=widths, stem=stem, layer_scale=ls,
                        drop_path=float(m["dp"]) if m["dp"] else (0.0 if plain else dp), plain=plain,
                        num_classes=1000 if stem == "imagenet" else 10)  # fmt: skip
    stated = ["family", "stage_depths", "widths", "stem", "plain"]
    stated += ["layer_scale"] * bool(m["ls"]) + ["drop_path"] * bool(m["dp"])
    return spec, {k: getattr(spec, k) for k in stated}


class ConvNeXtBlock(StreamUpdate):
    """torchvision's CNBlock: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, layer_scale: float, drop: float, plain: bool) -> None:
        super().__init__()
        self.plain, self.removed, self.dim = plain, False, dim
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale)))
        self.stochastic_depth = StochasticDepth(drop, "row")

    def residual(self, x: Tensor) -> Tensor:
        return self.layer_scale * self.block(x)

    def branch(self, x: Tensor) -> Tensor:
        """f(x) as the forward pass uses it: dropped per sample in training (inverted
        scaling, so nothing changes at test time)."""
        return self.stochastic_depth(self.residual(x))

    @property
    def signature(self) -> tuple:
        return (self.dim, self.dim, 1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W), as torchvision's."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(UnitNet):
    """A ConvNeXt built from a `ConvNeXtSpec`; `model.spec` is kept for checkpoints."""

    not_removable = (
        "the stem, the downsampling layers between stages (features.2, .4, .6: the only path, like a ResNet's "
        "projection) and the head are not residual and cannot be removed"
    )

    def __init__(self, spec: ConvNeXtSpec) -> None:
        super().__init__()
        self.spec = spec
        k, w0 = STEMS[spec.stem], spec.widths[0]
        layers: list[nn.Module] = [
            Conv2dNormActivation(
                spec.in_chans,
                w0,
                kernel_size=k,
                stride=k,
                padding=0,
                norm_layer=lambda c: LayerNorm2d(c, eps=1e-6),
                activation_layer=None,
                bias=True,
            )  # fmt: skip
        ]
        units, names, transitions, n = [], [], {}, spec.num_blocks
        for s, (depth, width) in enumerate(zip(spec.stage_depths, spec.widths)):
            stage = [
                ConvNeXtBlock(width, spec.layer_scale, spec.drop_path * (len(units) + b) / max(n - 1, 1), spec.plain)
                for b in range(depth)
            ]
            units += stage
            names += [f"stage{s + 1}.{b}" for b in range(depth)]
            layers.append(nn.Sequential(*stage))
            if s + 1 < len(spec.widths):
                down = nn.Sequential(LayerNorm2d(width, eps=1e-6), nn.Conv2d(width, spec.widths[s + 1], 2, stride=2))
                layers.append(down)
                transitions[len(units) - 1] = down
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = spec.widths[-1]
        self.classifier = nn.Sequential(LayerNorm2d(last, eps=1e-6), nn.Flatten(1), nn.Linear(last, spec.num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._set_units(units, names, transitions)

    def forward_stem(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, widths[0], H/k, W/k)."""
        return self.features[0](x)

    def forward_head(self, h: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, num_classes)."""
        return self.classifier(self.avgpool(h))
