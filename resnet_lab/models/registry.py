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
from typing import Any

import torch
from torch import nn

from .resnet import ResNet
from .spec import CIFAR_BOTTLENECK_NAMES, IMAGENET_LAYOUTS, ResNetSpec, SpecError

_REGISTRY: dict[str, Callable[[], ResNetSpec]] = {}
_FIXED: dict[str, dict[str, Any]] = {}  # name -> the spec fields the name itself states

# The architecture a specific name states; generic builders state only their family.
NAMED_FIELDS = ("family", "depth", "plain", "preact", "block_type")


def register_model(name: str, generic: bool = False, **fields: Any) -> None:
    """Register `name` as a default spec; the spec is validated now, not at use.
    A `generic` builder fixes only its family (and pre-activation): depth is free."""
    spec = ResNetSpec(**fields)
    _REGISTRY[name] = lambda: ResNetSpec(**fields)
    named = ("family", "preact") if generic else NAMED_FIELDS
    _FIXED[name] = {k: (spec.block if k == "block_type" else getattr(spec, k)) for k in named}


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

# The names ResNetSpec.name writes: [cifar_][preact_](resnet|plain)DEPTH[_basic|_bottleneck]
# [_sdP[s]][_activeK].
_NAME = re.compile(
    r"(?P<cifar>cifar_)?(?P<preact>preact_)?(?P<kind>resnet|plain)(?P<depth>\d+)(?P<block>_basic|_bottleneck)?"
    r"(?:_sd(?P<p>\d+(?:\.\d+)?)(?P<per_sample>s?))?(?:_active(?P<k>\d+))?"
)


def list_models() -> list[str]:
    """Registered names, CIFAR family first, each by depth."""

    def key(n: str) -> tuple:
        generic = not n[-1].isdigit()
        spec = _REGISTRY[n]()
        return (generic, spec.family != "cifar", spec.preact, n.rstrip("0123456789"), _depth(n))

    return sorted(_REGISTRY, key=key)


def _depth(name: str) -> int:
    digits = name[len(name.rstrip("0123456789")) :]
    return int(digits) if digits else 0


def _named_spec(name: str) -> tuple[ResNetSpec, dict[str, Any]] | None:
    """(spec, fields the name states) for a registered name or any name of the form
    ResNetSpec.name writes; None for anything else."""
    if name in _REGISTRY:
        return _REGISTRY[name](), dict(_FIXED[name])
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
    given = {k: v for k, v in overrides.items() if v is not None}
    clash = [f"{k}={given[k]!r}" for k, v in fixed.items() if k in given and given[k] != v]
    if clash:
        states = ", ".join(f"{k}={fixed[k]!r}" for k in fixed if k in {c.split("=")[0] for c in clash})
        preact = given.get("preact", spec.preact)
        generic = f"{spec.family}_{'preact_' if preact else ''}resnet"
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
        return spec.replace(**{k: v for k, v in given.items() if k in NAMED_FIELDS}).name
    except SpecError:
        return spec.name


def create_model(name: str, **overrides: Any) -> ResNet:
    """Build a registered network; `None` overrides keep the registry default."""
    return ResNet(resolve_spec(name, **overrides))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: ResNet, size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image at `size` (default:
    the family's native resolution). Counted by torch's FlopCounterMode on the
    meta device, so it costs no real compute."""
    from torch.utils.flop_counter import FlopCounterMode

    size = size or model.spec.input_size
    meta = ResNet(model.spec).to("meta").eval()
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
