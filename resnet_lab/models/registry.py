"""Model registry: short named entrypoints onto one builder (timm style).

create_model("resnet56")                      # CIFAR, option A
create_model("resnet56", shortcut="B")         # variants are overrides
create_model("cifar_resnet", depth=74)         # any valid depth via a generic builder
create_model("resnet50", num_classes=10, stride_on="1x1")

A name defines its architecture: `resnet56` is a residual, post-activation, depth-56
CIFAR net, and an override that contradicts the name (depth=20, plain=True) is an error
naming both. Overrides refine what the name leaves open (shortcut, width, stochastic
depth, ...). The generic builders (`cifar_resnet`, `imagenet_resnet`, and their
`_preact_` twins) fix only the family, so depth and plain are free there. Every name a
spec reports (`ResNetSpec.name`: `preact_resnet164_basic`, `resnet56_bottleneck`,
`preact_resnet110_sd0.5`, ...) resolves back to that architecture, registered or not.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .convnext import CONVNEXT_PRESETS, ConvNeXt, ConvNeXtSpec, parse_convnext_name
from .resnet import ResNet
from .spec import ALL_FAMILIES, CIFAR_BOTTLENECK_NAMES, IMAGENET_LAYOUTS, ResNetSpec, SpecError
from .vit import VisionTransformer, ViTSpec, parse_vit_name

Spec = ResNetSpec | ViTSpec | ConvNeXtSpec
Network = ResNet | VisionTransformer | ConvNeXt
# The non-ResNet families: `family` value -> (spec class, network class, its generic builder).
_FAMILIES: dict[str, tuple[type, type, str]] = {
    "vit": (ViTSpec, VisionTransformer, "cifar_vit"),
    "convnext": (ConvNeXtSpec, ConvNeXt, "cifar_convnext"),
}


def spec_from_dict(d: dict[str, Any]) -> Spec:
    """The spec a checkpoint stores, read back by the class of its family."""
    fam = d.get("family", "cifar")
    if fam in _FAMILIES:
        return _FAMILIES[fam][0].from_dict(d)
    if fam not in ("cifar", "imagenet"):
        raise SpecError(f"unknown family {fam!r}; valid: {ALL_FAMILIES}")
    return ResNetSpec.from_dict(d)


def build(spec: Spec) -> Network:
    """The network of a spec, of any family."""
    return _FAMILIES[spec.family][1](spec) if spec.family in _FAMILIES else ResNet(spec)


_REGISTRY: dict[str, Callable[[], Spec]] = {}
_FIXED: dict[str, dict[str, Any]] = {}  # name -> the spec fields the name itself states
_GENERIC: set[str] = set()  # the builders that fix only their family


@dataclass(frozen=True)
class PaperError:
    """A top-1 error the literature reports for exactly this registered architecture."""

    error: float  # %
    source: str  # paper, table, and any difference from the registered net
    budget: str  # the paper's training budget, to set beside a run's

    def label(self) -> str:
        return f"{self.error:.2f} ({self.source}; {self.budget})"


@dataclass(frozen=True)
class ModelMeta:
    """Facts of a registered network (like torchvision's `Weights.meta`): the exact
    parameter count, the multiply-accumulates of one forward pass of one image at the
    family's native size, and the paper's reported error (None: none reported)."""

    params: int
    macs: int
    paper: PaperError | None


_CIFAR = "64k iterations, batch 128"
_IMAGENET = "600k iterations, batch 256"
_T6, _T4 = "He et al. 2015, Table 6 (CIFAR-10 test)", "He et al. 2016, Table 4 (CIFAR-10 test, median of 5)"
_T2 = "He et al. 2015, Table 2 (ImageNet val, 10-crop"
_T3 = "He et al. 2015, Table 3 (ImageNet val, 10-crop"
_V1 = "; the paper's stride on the 1x1, this net's on the 3x3)"
_L1 = "Liu et al. 2022, Table 1 (ImageNet-1k val, 224 px, single crop)"
_CONVNEXT = "300 epochs, batch 4096, AdamW"
# name: (params, MACs/image, paper error or None). Tests check every count against the
# built network; `resnet-lab models`, the README table and sweep summaries read them here.
_FACTS: dict[str, tuple[int, int, PaperError | None]] = {
    "resnet20": (269_722, 40_551_040, PaperError(8.75, _T6, _CIFAR)),
    "resnet32": (464_154, 68_862_592, PaperError(7.51, _T6, _CIFAR)),
    "resnet44": (658_586, 97_174_144, PaperError(7.17, _T6, _CIFAR)),
    "resnet56": (853_018, 125_485_696, PaperError(6.97, _T6, _CIFAR)),
    "resnet110": (1_727_962, 252_887_680, PaperError(6.43, _T6 + ", best of 5; mean 6.61 ± 0.16", _CIFAR)),
    "resnet1202": (19_421_274, 2_829_238_912, PaperError(7.93, _T6, _CIFAR)),
    # He et al. show plain CIFAR nets only as curves (Fig. 6): no number to quote.
    "plain20": (269_722, 40_551_040, None),
    "plain32": (464_154, 68_862_592, None),
    "plain44": (658_586, 97_174_144, None),
    "plain56": (853_018, 125_485_696, None),
    "plain110": (1_727_962, 252_887_680, None),
    "resnet18": (11_689_512, 1_814_073_344, PaperError(27.88, _T2 + "; option A, this net: B)", _IMAGENET)),
    "resnet34": (21_797_672, 3_663_761_408, PaperError(24.52, _T3 + ", option B)", _IMAGENET)),
    "resnet50": (25_557_032, 4_089_184_256, PaperError(22.85, _T3 + _V1, _IMAGENET)),
    "resnet101": (44_549_160, 7_801_405_440, PaperError(21.75, _T3 + _V1, _IMAGENET)),
    "resnet152": (60_192_808, 11_513_626_624, PaperError(21.43, _T3 + _V1, _IMAGENET)),
    "plain18": (11_515_688, 1_794_805_760, PaperError(27.94, _T2 + ")", _IMAGENET)),
    "plain34": (21_623_848, 3_644_493_824, PaperError(28.54, _T2 + ")", _IMAGENET)),
    "preact_resnet20": (269_722, 40_551_040, None),
    "preact_resnet32": (464_154, 68_862_592, None),
    "preact_resnet44": (658_586, 97_174_144, None),
    "preact_resnet56": (853_018, 125_485_696, None),
    "preact_resnet110": (1_727_962, 252_887_680, PaperError(6.37, "He et al. 2016, Table 3 (CIFAR-10 test)", _CIFAR)),
    "preact_resnet164": (1_703_258, 247_646_720, PaperError(5.46, _T4, _CIFAR)),
    "preact_resnet1001": (10_327_706, 1_490_995_712, PaperError(4.92, _T4, _CIFAR)),
    "preact_resnet18": (11_687_720, 1_814_073_344, None),
    "preact_resnet34": (21_795_880, 3_663_761_408, None),
    "preact_resnet50": (25_549_352, 4_089_184_256, None),
    "preact_resnet101": (44_541_480, 7_801_405_440, None),
    "preact_resnet152": (
        60_185_128,
        11_513_626_624,
        PaperError(21.1, "He et al. 2016, Table 5 (ImageNet val, single 320px crop)", "the paper's ImageNet schedule"),
    ),
    "preact_resnet200": (
        64_666_152,
        15_007_481_856,
        PaperError(20.7, "He et al. 2016, Table 5 (ImageNet val, single 320px crop)", "the paper's ImageNet schedule"),
    ),
    # Dosovitskiy et al. 2021 report ImageNet-1k-only ViTs fine-tuned at 384 px, not these 224 px nets: no number.
    "cifar_vit6": (2_693_578, 182_849_664, None),
    "cifar_vit12": (5_362_762, 365_107_584, None),
    "cifar_plain_vit6": (2_693_578, 182_849_664, None),
    "cifar_plain_vit12": (5_362_762, 365_107_584, None),
    "vit_b_16": (86_567_656, 17_563_828_224, None),
    "vit_b_32": (88_224_232, 4_409_186_304, None),
    "vit_l_16": (304_326_632, 61_554_712_576, None),
    "cifar_convnext_atto": (3_376_290, 44_288_640, None),
    "plain_cifar_convnext_atto": (3_376_290, 44_288_640, None),
    "convnext_tiny": (28_589_128, 4_455_531_264, PaperError(17.9, _L1, _CONVNEXT)),
    "convnext_small": (50_223_688, 8_683_712_256, PaperError(16.9, _L1, _CONVNEXT)),
    "convnext_base": (88_591_464, 15_354_729_472, PaperError(16.2, _L1, _CONVNEXT)),
    "convnext_large": (197_767_336, 34_361_433_600, PaperError(15.7, _L1, _CONVNEXT)),
}

# The architecture a specific name states; generic builders state only their family.
NAMED_FIELDS = ("family", "depth", "plain", "preact", "block_type")


def register_model(name: str, generic: bool = False, **fields: Any) -> None:
    """Register `name` as a default spec; the spec is validated now, not at use.
    A `generic` builder fixes only its family (and pre-activation): depth is free.
    A ViT or ConvNeXt name states what its name parser reads from it."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered; choose another name")
    fam = fields.get("family", "cifar")
    spec_cls = _FAMILIES[fam][0] if fam in _FAMILIES else ResNetSpec
    spec = spec_cls(**fields)
    _REGISTRY[name] = lambda: spec_cls(**fields)
    if generic:
        _GENERIC.add(name)
    if fam in _FAMILIES:
        _FIXED[name] = {"family": fam} if generic else _parsed(name)[1]
        return
    named = ("family", "preact") if generic else NAMED_FIELDS
    _FIXED[name] = {k: (spec.block if k == "block_type" else getattr(spec, k)) for k in named}


def _parsed(name: str) -> tuple[Spec, dict[str, Any]] | None:
    return parse_vit_name(name) or parse_convnext_name(name)


# CIFAR-10 (He et al. Sec. 4.2): depth 6n+2, option A, 10 classes.
for _d in (20, 32, 44, 56, 110, 1202):
    register_model(f"resnet{_d}", family="cifar", depth=_d)
for _d in (20, 32, 44, 56, 110):
    register_model(f"plain{_d}", family="cifar", depth=_d, plain=True)
# ImageNet (Table 1): option B, torchvision's v1.5 stride placement, 1000 classes.
for _d in (18, 34, 50, 101, 152):
    register_model(f"resnet{_d}", family="imagenet", depth=_d, shortcut="B", num_classes=1000)
for _d in (18, 34):
    register_model(f"plain{_d}", family="imagenet", depth=_d, plain=True, num_classes=1000)
# Pre-activation nets (He et al. 2016). CIFAR basic (6n+2) with option A like resnetN;
# preact_resnet110 is Veit et al.'s model. CIFAR bottleneck (9n+2) and ImageNet use
# option B, as He et al. 2016 (projections only where shapes change).
for _d in (20, 32, 44, 56, 110):
    register_model(f"preact_resnet{_d}", family="cifar", depth=_d, preact=True)
for _d in (164, 1001):
    register_model(f"preact_resnet{_d}", family="cifar", depth=_d, preact=True, block_type="bottleneck", shortcut="B")
for _d in (18, 34, 50, 101, 152, 200):
    register_model(f"preact_resnet{_d}", family="imagenet", depth=_d, preact=True, shortcut="B", num_classes=1000)
# Generic builders: the family's defaults, depth given as an override.
register_model("cifar_resnet", generic=True, family="cifar", depth=20)
register_model("imagenet_resnet", generic=True, family="imagenet", depth=18, shortcut="B", num_classes=1000)
register_model("cifar_preact_resnet", generic=True, family="cifar", depth=20, preact=True)
register_model(
    "imagenet_preact_resnet", generic=True, family="imagenet", depth=18, preact=True, shortcut="B", num_classes=1000
)

# Vision Transformers (Dosovitskiy et al. 2021): the CIFAR preset (patch 4 at 32 px, width
# 192, 3 heads, MLP 768) at depth 6 and 12, residual and plain; torchvision's ImageNet nets.
for _d in (6, 12):
    register_model(f"cifar_vit{_d}", family="vit", depth=_d)
    register_model(f"cifar_plain_vit{_d}", family="vit", depth=_d, plain=True)
for _n in ("vit_b_16", "vit_b_32", "vit_l_16"):
    register_model(_n, **parse_vit_name(_n)[0].to_dict())
# ConvNeXts (Liu et al. 2022): the CIFAR preset, residual and plain; torchvision's ImageNet nets.
for _n in CONVNEXT_PRESETS:
    register_model(_n, **parse_convnext_name(_n)[0].to_dict())
register_model("plain_cifar_convnext_atto", **parse_convnext_name("plain_cifar_convnext_atto")[0].to_dict())
register_model("cifar_vit", generic=True, family="vit", depth=6)
register_model("cifar_convnext", generic=True, family="convnext")

# The names ResNetSpec.name writes: [cifar_][preact_](resnet|plain)DEPTH[_basic|_bottleneck]
# [_sdP[s]][_activeK].
_NAME = re.compile(
    r"(?P<cifar>cifar_)?(?P<preact>preact_)?(?P<kind>resnet|plain)(?P<depth>\d+)(?P<block>_basic|_bottleneck)?"
    r"(?:_sd(?P<p>\d+(?:\.\d+)?)(?P<per_sample>s?))?(?:_active(?P<k>\d+))?"
)


def model_meta(name: str) -> ModelMeta | None:
    """The facts of a registered name (None for generic builders and unregistered names)."""
    facts = _FACTS.get(name)
    return ModelMeta(*facts) if facts else None


def paper_error(spec: ResNetSpec) -> PaperError | None:
    """The paper's error for this exact architecture: only when `spec` is the registered
    net of its name (same shortcut, classes, width, ...), never for a variant of it."""
    meta = model_meta(spec.name)
    return meta.paper if meta and _REGISTRY[spec.name]() == spec else None


def list_models() -> list[str]:
    """Registered names, CIFAR family first, each by depth."""

    def key(n: str) -> tuple:
        spec = _REGISTRY[n]()
        rank = ("cifar", "imagenet", "vit", "convnext").index(spec.family)
        return (n in _GENERIC, rank, getattr(spec, "preact", False), n.rstrip("0123456789"), _depth(n))

    return sorted(_REGISTRY, key=key)


def _depth(name: str) -> int:
    digits = name[len(name.rstrip("0123456789")) :]
    return int(digits) if digits else 0


def _named_spec(name: str) -> tuple[ResNetSpec, dict[str, Any]] | None:
    """(spec, fields the name states) for a registered name or any name of the form
    ResNetSpec.name writes; None for anything else."""
    if name in _REGISTRY:
        return _REGISTRY[name](), dict(_FIXED[name])
    if (found := _parsed(name)) is not None:
        return found
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    depth, block = int(m["depth"]), (m["block"] or "").lstrip("_") or None
    base = name[: m.end("block") if m["block"] else m.end("depth")]
    if base in _REGISTRY:
        spec, fixed = _REGISTRY[base](), dict(_FIXED[base])
    else:
        cifar = bool(m["cifar"] or block) or depth not in IMAGENET_LAYOUTS
        if cifar and block is None and depth in CIFAR_BOTTLENECK_NAMES:
            block = "bottleneck"  # resnet164 / resnet1001 are the bottleneck nets (He et al. 2016)
        fields: dict[str, Any] = {"family": "cifar" if cifar else "imagenet", "depth": depth}
        fields.update(plain=m["kind"] == "plain", preact=bool(m["preact"]))
        if cifar:
            bottleneck = block == "bottleneck"
            fields.update(block_type="bottleneck" if bottleneck else None)
            fields.update(shortcut="B" if bottleneck and m["kind"] != "plain" else "A")
        else:
            fields.update(shortcut="A" if m["kind"] == "plain" else "B", num_classes=1000)
        spec = ResNetSpec(**fields)
        fixed = {k: (spec.block if k == "block_type" else getattr(spec, k)) for k in NAMED_FIELDS}
    drops: dict[str, Any] = {}
    if m["p"] is not None:
        drops = {"stochastic_depth": "sample" if m["per_sample"] else "batch", "survival_last": float(m["p"])}
    if m["k"] is not None:
        drops["active_blocks"] = int(m["k"])
    return spec.replace(**drops), {**fixed, **drops}


def named_fields(name: str) -> dict[str, Any]:
    """The spec fields `name` itself states (depth, plain, ... for `resnet56`; only the
    family for `cifar_resnet`); empty for an unknown name."""
    try:
        found = _named_spec(name)
    except SpecError:
        return {}
    return found[1] if found else {}


def resolve_spec(name: str, **overrides: Any) -> ResNetSpec:
    """The architecture `name` states with non-None `overrides` applied. An override
    that contradicts the name (resnet20 with depth=56, plain20 with plain=False) is an
    error naming both: the name would otherwise silently lose."""
    try:
        found = _named_spec(name)
    except SpecError as e:  # a name of the right shape but an impossible net (resnet21)
        raise SpecError(
            f"unknown model {name!r}: {e}. Did you mean {', '.join(_close(name)) or 'cifar_resnet'}?"
        ) from None
    if found is None:
        close = _close(name)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SpecError(f"unknown model {name!r}.{hint} Valid: {', '.join(list_models())}")
    spec, fixed = found
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    clash = [f"{k}={given[k]!r}" for k, v in fixed.items() if k in given and given[k] != v]
    if clash:
        states = ", ".join(f"{k}={fixed[k]!r}" for k in fixed if k in {c.split("=")[0] for c in clash})
        if spec.family in _FAMILIES:
            generic = _FAMILIES[spec.family][2]
        else:
            generic = f"{spec.family}_{'preact_' if given.get('preact', spec.preact) else ''}resnet"
        raise SpecError(
            f"model {name!r} is {states}, but {', '.join(clash)} was given. A name defines its architecture: "
            f"pick the name you mean (e.g. {_suggest(spec, given)!r}), or the generic {generic!r} with these options"
        )
    return spec.replace(**given)


def _close(name: str) -> list[str]:
    return difflib.get_close_matches(name, list(_REGISTRY), n=3)


def _suggest(spec: ResNetSpec, given: dict[str, Any]) -> str:
    """The registry-style name of `spec` with the clashing overrides applied, when valid."""
    try:
        return spec.replace(**{k: v for k, v in given.items() if k in NAMED_FIELDS or k in _parsed_fields(spec)}).name
    except SpecError:
        return spec.name


def _parsed_fields(spec: Spec) -> set[str]:
    found = _parsed(spec.name) if spec.family in _FAMILIES else None
    return set(found[1]) if found else set()


def create_model(name: str, **overrides: Any) -> Network:
    """Build a registered network; `None` overrides keep the registry default."""
    return build(resolve_spec(name, **overrides))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: Network, size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image at `size` (default:
    the family's native resolution). Counted by torch's FlopCounterMode on the
    meta device, so it costs no real compute."""
    from torch.utils.flop_counter import FlopCounterMode

    size = size or model.spec.input_size
    with torch.device("meta"):
        meta = build(model.spec).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        meta(torch.empty(1, model.spec.in_chans, size, size, device="meta"))
    return fc.get_total_flops() // 2  # FlopCounter counts a MAC as 2 FLOPs


def load_torchvision_weights(model: ResNet, state_dict: dict[str, torch.Tensor]) -> ResNet:
    """Load a torchvision ResNet-18/34/50/101/152 state dict into `model`.

    The model must be the matching ImageNet, option-B, stride-on-3x3 (v1.5)
    residual net; module names are identical, so outputs match torchvision's.
    """
    s = model.spec
    if s.family != "imagenet" or s.plain or s.shortcut != "B" or s.stride_on != "3x3":
        raise SpecError(
            f"torchvision weights need an ImageNet residual net with shortcut='B' and stride_on='3x3'; "
            f"got {s}. Build it with create_model('resnet{s.depth}')"
        )
    fc = state_dict.get("fc.weight")
    if fc is not None and fc.shape[0] != s.num_classes:
        raise SpecError(
            f"state dict has {fc.shape[0]} classes, model has {s.num_classes}: "
            f"create_model('resnet{s.depth}', num_classes={fc.shape[0]})"
        )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise SpecError(
            f"state dict does not fit {s.name}: missing {missing[:4]}..., unexpected {unexpected[:4]}... "
            "(is it from a different depth?)"
        )
    return model
