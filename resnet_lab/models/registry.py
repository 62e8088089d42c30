"""Model registry: short named entrypoints onto one builder (timm style).

create_model("resnet56")                      # CIFAR, option A
create_model("resnet56", shortcut="B")         # variants are overrides
create_model("resnet20", depth=74)             # any valid depth via the generic builder
create_model("resnet50", num_classes=10, stride_on="1x1")
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .resnet import ResNet
from .spec import ResNetSpec, SpecError

_REGISTRY: dict[str, Callable[[], ResNetSpec]] = {}


def register_model(name: str, **fields: Any) -> None:
    """Register `name` as a default spec; the spec is validated now, not at use."""
    ResNetSpec(**fields)
    _REGISTRY[name] = lambda: ResNetSpec(**fields)


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
register_model("cifar_resnet", family="cifar", depth=20)
register_model("imagenet_resnet", family="imagenet", depth=18, shortcut="B", num_classes=1000)
register_model("cifar_preact_resnet", family="cifar", depth=20, preact=True)
register_model("imagenet_preact_resnet", family="imagenet", depth=18, preact=True, shortcut="B", num_classes=1000)


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


def resolve_spec(name: str, **overrides: Any) -> ResNetSpec:
    """The registry default for `name` with non-None `overrides` applied."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SpecError(f"unknown model {name!r}.{hint} Valid: {', '.join(list_models())}")
    return _REGISTRY[name]().replace(**overrides)


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
