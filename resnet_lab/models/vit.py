"""Vision Transformers (Dosovitskiy et al. 2021) in torchvision's layout, with unit surgery.

  patchify conv (p x p, stride p) -> [class token; patches] + position embedding
  -> depth x encoder layer -> LayerNorm -> class token -> linear head

Each encoder layer holds two residual updates (pre-norm), and each is a unit:
  `layer{i}.attn`: x + MHSA(LN_1(x)),   `layer{i}.mlp`: x + MLP(LN_2(x)).
`remove_blocks(["layer3"])` removes both updates of layer 3. A plain ViT (`plain=True`)
drops the additions (x = MHSA(LN_1(x)), then x = MLP(LN_2(x))): He et al.'s degradation
question for transformers, and the setting of Dong et al. 2021's rank collapse.

Module names match torchvision (`conv_proj`, `class_token`, `encoder.pos_embedding`,
`encoder.layers.encoder_layer_0.ln_1`, `.self_attention`, `.mlp.0`, `encoder.ln`,
`heads.head`), so torchvision's `vit_b_16` state dict loads as is. Initialisation is
torchvision's except the head, drawn from N(0, 0.02^2) truncated instead of zeros: a
zero head makes an untrained net's loss and input gradients constant, which the
`init:` studies would measure as a property of the architecture.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .spec import SpecBase, SpecError, check_positive
from .surgery import StreamUpdate, UnitNet

# torchvision's ImageNet ViTs: (image, patch, width, heads, MLP width, depth).
TORCHVISION_VITS: dict[str, tuple[int, int, int, int, int, int]] = {
    "vit_b_16": (224, 16, 768, 12, 3072, 12),
    "vit_b_32": (224, 32, 768, 12, 3072, 12),
    "vit_l_16": (224, 16, 1024, 16, 4096, 24),
    "vit_l_32": (224, 32, 1024, 16, 4096, 24),
    "vit_h_14": (224, 14, 1280, 16, 5120, 32),
}
# The CIFAR preset (patch 4 at 32 px: 64 patches + the class token; DeiT-Tiny's widths).
CIFAR_VIT = (32, 4, 192, 3, 768)
_CANONICAL = re.compile(
    r"(?P<plain>plain_)?vit(?P<depth>\d+)_i(?P<i>\d+)_p(?P<p>\d+)_w(?P<w>\d+)_h(?P<h>\d+)_m(?P<m>\d+)"
)
_CIFAR = re.compile(r"cifar_(?P<plain>plain_)?vit(?P<depth>\d+)")
_TV = re.compile(r"(?P<plain>plain_)?(?P<tv>vit_[bhl]_\d+)")


@dataclass(frozen=True)
class ViTSpec(SpecBase):
    """Everything needed to build one Vision Transformer.

    depth: encoder layers (each holds two units: attention and MLP).
    image_size, patch_size: the input is image_size px square, cut into
        (image_size / patch_size)^2 patches; patch_size must divide image_size.
    width: the token width (torchvision's hidden_dim); heads must divide it.
    mlp_dim: the MLP's hidden width (4 x width in every ViT of the paper).
    plain: no residual additions (see the module docstring).
    """

    BATCHNORM: ClassVar[bool] = False  # LayerNorm

    family: Literal["vit"] = "vit"
    depth: int = 6
    image_size: int = CIFAR_VIT[0]
    patch_size: int = CIFAR_VIT[1]
    width: int = CIFAR_VIT[2]
    heads: int = CIFAR_VIT[3]
    mlp_dim: int = CIFAR_VIT[4]
    num_classes: int = 10
    plain: bool = False
    in_chans: int = 3

    def __post_init__(self) -> None:
        sizes = ("depth", "image_size", "patch_size", "width", "heads", "mlp_dim", "num_classes", "in_chans")
        check_positive(**{k: getattr(self, k) for k in sizes})
        if self.image_size % self.patch_size:
            ok = [p for p in range(2, self.image_size) if self.image_size % p == 0][:6]
            raise SpecError(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}; "
                f"use a divisor such as {', '.join(map(str, ok))}"
            )
        if self.width % self.heads:
            ok = [h for h in range(1, self.width + 1) if self.width % h == 0][:8]
            raise SpecError(
                f"heads={self.heads} does not divide width={self.width}; use one of {', '.join(map(str, ok))}, ..."
            )

    @property
    def num_blocks(self) -> int:
        return 2 * self.depth

    @property
    def block(self) -> str:
        return "attn+MLP"

    @property
    def input_size(self) -> int:
        return self.image_size

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return (self.image_size, self.patch_size, self.width, self.heads, self.mlp_dim)

    @property
    def name(self) -> str:
        """`cifar_vit6`, `vit_b_16`, `plain_vit_b_16`, or for any other shape
        `vit8_i32_p4_w256_h4_m1024` (every such name resolves back to the net)."""
        plain = "plain_" if self.plain else ""
        if self.dims == CIFAR_VIT:
            return f"cifar_{plain}vit{self.depth}"
        for tv, (*dims, depth) in TORCHVISION_VITS.items():
            if tuple(dims) == self.dims and depth == self.depth:
                return plain + tv
        i, p, w, h, m = self.dims
        return f"{plain}vit{self.depth}_i{i}_p{p}_w{w}_h{h}_m{m}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTSpec:
        return cls(**d)


def parse_vit_name(name: str) -> tuple[ViTSpec, dict[str, Any]] | None:
    """(spec, the fields the name states) for any name `ViTSpec.name` writes."""
    stated = ("depth", "plain", "image_size", "patch_size", "width", "heads", "mlp_dim")
    if m := _CIFAR.fullmatch(name):
        spec = ViTSpec(depth=int(m["depth"]), plain=bool(m["plain"]))
    elif (m := _TV.fullmatch(name)) and m["tv"] in TORCHVISION_VITS:
        i, p, w, h, mlp, depth = TORCHVISION_VITS[m["tv"]]
        spec = ViTSpec(depth=depth, image_size=i, patch_size=p, width=w, heads=h, mlp_dim=mlp, num_classes=1000,
                       plain=bool(m["plain"]))  # fmt: skip
    elif m := _CANONICAL.fullmatch(name):
        spec = ViTSpec(depth=int(m["depth"]), image_size=int(m["i"]), patch_size=int(m["p"]), width=int(m["w"]),
                       heads=int(m["h"]), mlp_dim=int(m["m"]), plain=bool(m["plain"]))  # fmt: skip
    else:
        return None
    return spec, {k: getattr(spec, k) for k in ("family", *stated)}


class EncoderLayer(nn.Module):
    """torchvision's EncoderBlock: LN_1 -> MHSA, LN_2 -> MLP (Linear, GELU, Linear)."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.width, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(spec.width, spec.heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(spec.width, eps=1e-6)
        # Indices as torchvision's MLP (Linear, GELU, Dropout, Linear, Dropout): mlp.0 and mlp.3.
        self.mlp = nn.Sequential(
            nn.Linear(spec.width, spec.mlp_dim), nn.GELU(), nn.Identity(), nn.Linear(spec.mlp_dim, spec.width)
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class AttentionUpdate(StreamUpdate):
    """x -> x + MHSA(LN_1(x)) of one encoder layer (B, T, D) -> (B, T, D)."""

    def __init__(self, layer: EncoderLayer, plain: bool) -> None:
        super().__init__()
        self.layer, self.plain, self.removed = layer, plain, False
        self.width = layer.ln_1.normalized_shape[0]

    def residual(self, x: Tensor) -> Tensor:
        x = self.layer.ln_1(x)
        return self.layer.self_attention(x, x, x, need_weights=False)[0]

    @property
    def signature(self) -> tuple:
        return (self.width, self.width, 1)


class MLPUpdate(AttentionUpdate):
    """x -> x + MLP(LN_2(x)) of one encoder layer (B, T, D) -> (B, T, D)."""

    def residual(self, x: Tensor) -> Tensor:
        return self.layer.mlp(self.layer.ln_2(x))


class Encoder(nn.Module):
    """torchvision's Encoder: position embedding, the layers, the final LayerNorm."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        seq = (spec.image_size // spec.patch_size) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, spec.width).normal_(std=0.02))
        self.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", EncoderLayer(spec)) for i in range(spec.depth)))
        self.ln = nn.LayerNorm(spec.width, eps=1e-6)


class VisionTransformer(UnitNet):
    """A ViT built from a `ViTSpec`; `model.spec` is kept for checkpoints."""

    not_removable = (
        "the patch embedding and the head are not residual and cannot be removed; a whole layer is its two units "
        "(layerI.attn layerI.mlp)"
    )

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        p = spec.patch_size
        self.conv_proj = nn.Conv2d(spec.in_chans, spec.width, p, stride=p)
        self.class_token = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.encoder = Encoder(spec)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(spec.width, spec.num_classes)))
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (spec.in_chans * p * p)))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.trunc_normal_(self.heads.head.weight, std=0.02)
        nn.init.zeros_(self.heads.head.bias)
        units, names = [], []
        for i, layer in enumerate(self.encoder.layers):
            units += [AttentionUpdate(layer, spec.plain), MLPUpdate(layer, spec.plain)]
            names += [f"layer{i}.attn", f"layer{i}.mlp"]
        self._set_units(units, names, {})

    def expand_names(self, names: Any) -> list[str]:
        """`layer3` stands for both of its units, `layer3.attn` and `layer3.mlp`."""
        out = []
        for n in names:
            out += [f"{n}.attn", f"{n}.mlp"] if re.fullmatch(r"layer\d+", n) and f"{n}.attn" in self._names else [n]
        return out

    def forward_stem(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, 1 + (S/p)^2, width): class token and patch tokens, embedded."""
        if x.shape[-2:] != (self.spec.image_size,) * 2:
            raise ValueError(
                f"{self.spec.name} takes {self.spec.image_size} px images, got {tuple(x.shape[-2:])}: "
                "its position embedding is fixed to that size"
            )
        h = self.conv_proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.class_token.expand(len(x), -1, -1), h], dim=1)
        return h + self.encoder.pos_embedding

    def pool(self, h: Tensor) -> Tensor:
        """(B, T, width) -> (B, width): the mean over all tokens, the class token's too (the
        class token alone carries little before the late layers have attended to it)."""
        return h.mean(1)

    def forward_head(self, h: Tensor) -> Tensor:
        """(B, T, width) -> (B, num_classes), from the class token after the final LayerNorm."""
        return self.heads(self.encoder.ln(h)[:, 0])
