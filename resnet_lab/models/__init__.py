"""Residual and plain networks of He et al. 2015 (see resnet.py) and their registry."""

from .registry import (
    count_macs,
    count_params,
    create_model,
    list_models,
    load_torchvision_weights,
    named_fields,
    register_model,
    resolve_spec,
)
from .resnet import BasicBlock, Bottleneck, ResidualBlock, ResNet, ShortcutA
from .spec import ResNetSpec, SpecError

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNetSpec",
    "ResidualBlock",
    "ShortcutA",
    "SpecError",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "load_torchvision_weights",
    "named_fields",
    "register_model",
    "resolve_spec",
]
