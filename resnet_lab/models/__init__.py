"""Residual and plain networks of He et al. 2015 (see resnet.py) and their registry."""

from .registry import (
    ModelMeta,
    PaperError,
    count_macs,
    count_params,
    create_model,
    list_models,
    load_torchvision_weights,
    model_meta,
    named_fields,
    paper_error,
    register_model,
    resolve_spec,
)
from .resnet import BasicBlock, Bottleneck, ResidualBlock, ResNet, ShortcutA
from .spec import ResNetSpec, SpecError

__all__ = [
    "BasicBlock",
    "ModelMeta",
    "PaperError",
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
    "model_meta",
    "named_fields",
    "paper_error",
    "register_model",
    "resolve_spec",
]
