"""The zoo: residual and plain ResNets of He et al. 2015/2016 (resnet.py), Vision
Transformers (vit.py) and ConvNeXts (convnext.py), their shared surgery (surgery.py)
and their registry."""

from .convnext import ConvNeXt, ConvNeXtSpec
from .registry import (
    ModelMeta,
    Network,
    PaperError,
    Spec,
    build,
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
    spec_from_dict,
)
from .resnet import BasicBlock, Bottleneck, ResidualBlock, ResNet, ShortcutA
from .spec import ResNetSpec, SpecError
from .surgery import StreamUpdate, UnitNet
from .vit import VisionTransformer, ViTSpec

__all__ = [
    "BasicBlock",
    "ConvNeXt",
    "ConvNeXtSpec",
    "Network",
    "Spec",
    "StreamUpdate",
    "UnitNet",
    "ViTSpec",
    "VisionTransformer",
    "build",
    "spec_from_dict",
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
