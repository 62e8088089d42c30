"""Pretrained torchvision ResNets, ViTs and ConvNeXts as ablation inputs (Veit et al. also
lesioned an ImageNet ResNet-200): no training needed, and nothing is ever downloaded.

    resnet-lab ablate torchvision:resnet50 --data-folder /data/imagenet/val ...
    resnet-lab ablate torchvision:vit_b_16 torchvision:convnext_tiny --data-folder ...
    resnet-lab ablate torchvision:resnet50=/path/resnet50.pth ...   # a given file, checked against the name
    resnet-lab ablate /path/resnet18.pth ...                         # a bare state dict: depth read from its keys

`torchvision:NAME` reads the file torchvision itself caches, `<torch hub dir>/checkpoints/
NAME-<hash>.pth` (`torchvision.models.NAME(weights=...)` puts it there when online).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models import create_model, load_torchvision_weights
from ..models.convnext import CONVNEXT_PRESETS
from ..models.spec import IMAGENET_LAYOUTS
from ..models.vit import TORCHVISION_VITS

PREFIX = "torchvision:"
DATA = "resnet_lab.data.imagenet.ImageNetDataModule"


class WeightsError(UserError, ValueError):
    """Pretrained weights that cannot be found, read or matched; the message says how to fix it."""


def is_torchvision_ref(arg: str) -> bool:
    return arg.startswith(PREFIX)


def is_state_dict(obj: Any) -> bool:
    """A bare torchvision-style ResNet state dict (not a Lightning checkpoint)."""
    return isinstance(obj, dict) and "conv1.weight" in obj and "fc.weight" in obj


def hub_file(name: str) -> Path:
    """The cached torchvision weights of `name` (e.g. resnet50), never downloaded."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(folder.glob(f"{name}-*.pth"))
    if not found:
        raise WeightsError(
            f"no cached torchvision weights for {name} in {folder}; resnet-lab never downloads them. On a machine "
            f"online, run `python -c \"import torchvision; torchvision.models.{name}(weights='DEFAULT')\"` (it caches "
            f"the file there), or pass a file: {PREFIX}{name}=PATH"
        )
    if len(found) > 1:
        raise WeightsError(
            f"several cached weights for {name}: {[p.name for p in found]}; pick one with {PREFIX}{name}=PATH"
        )
    return found[0]


def layout_of(sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(depth, num_classes) of a torchvision ResNet state dict, read from its keys."""
    blocks = {}
    for k in sd:
        m = re.match(r"layer(\d)\.(\d+)\.", k)
        if m:
            s, b = int(m[1]), int(m[2])
            blocks[s] = max(blocks.get(s, 0), b + 1)
    layers = tuple(blocks.get(s, 0) for s in (1, 2, 3, 4))
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    for depth, (block, lay) in IMAGENET_LAYOUTS.items():
        if (block, lay) == (kind, layers):
            return depth, int(sd["fc.weight"].shape[0])
    raise WeightsError(f"the state dict is not a torchvision ResNet of a known depth ({kind} blocks, stages {layers})")


TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)  # the ResNets torchvision.models ships weights for


# torchvision's ViTs and ConvNeXts (the zoo's names for them), and the key of their
# classifier's weight (its classes).
OTHER_FAMILIES = {
    **{n: "heads.head.weight" for n in TORCHVISION_VITS},
    **{n: "classifier.2.weight" for n, (stem, *_) in CONVNEXT_PRESETS.items() if stem == "imagenet"},
}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e})") from e


def other_family(name: str, path: Path) -> tuple[str, str, Any, dict[str, Any]]:
    """A torchvision ViT or ConvNeXt state dict in the resnet-lab net of the same name."""
    sd = read_state_dict(path)
    head = sd.get(OTHER_FAMILIES[name]) if isinstance(sd, dict) else None
    if head is None:
        raise WeightsError(f"{path} is not a torchvision {name} state dict (no {OTHER_FAMILIES[name]})")
    model = create_model(name, num_classes=int(head.shape[0]))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path} does not fit {name}: {first} (is it the weights of another net?)") from None
    model.eval().to(memory_format=torch.channels_last)
    data = {"class_path": DATA, "init_args": {"path": None, "num_workers": 2}}
    return str(path), f"{name} (torchvision: {path.name})", model, data


def load_pretrained(arg: str) -> tuple[str, str, Any, dict[str, Any]]:
    """(path, label, model, data config) for `torchvision:NAME[=PATH]` or a state-dict file."""
    if is_torchvision_ref(arg):
        name, _, file = arg[len(PREFIX) :].partition("=")
        if name in OTHER_FAMILIES:
            return other_family(name, Path(file) if file else hub_file(name))
        m = re.fullmatch(r"resnet(\d+)", name)
        if not m or int(m[1]) not in IMAGENET_LAYOUTS:
            valid = ", ".join([*(f"resnet{d}" for d in IMAGENET_LAYOUTS), *OTHER_FAMILIES])
            raise WeightsError(f"unknown torchvision model {name!r} in {arg!r}; valid: {valid}")
        if not file and int(m[1]) not in TORCHVISION_DEPTHS:
            raise WeightsError(
                f"torchvision ships no {name} (its ResNets: {', '.join(f'resnet{d}' for d in TORCHVISION_DEPTHS)}); "
                f"pass a state-dict file in torchvision's layout: {PREFIX}{name}=PATH"
            )
        path = Path(file) if file else hub_file(name)
        want: int | None = int(m[1])
    else:
        path, want = Path(arg), None
    return from_state_dict(str(path), read_state_dict(path), want)


def from_state_dict(path: str, sd: dict[str, torch.Tensor], want: int | None = None):
    if not is_state_dict(sd):
        raise WeightsError(f"{path} is neither a resnet-lab checkpoint nor a torchvision ResNet state dict")
    depth, classes = layout_of(sd)
    if want is not None and depth != want:
        raise WeightsError(
            f"{path} holds a resnet{depth} state dict, not a resnet{want}: pass torchvision:resnet{depth}={path}, "
            "or the right file"
        )
    model = load_torchvision_weights(create_model(f"resnet{depth}", num_classes=classes), sd)
    model.eval().to(memory_format=torch.channels_last)
    label = f"resnet{depth} (torchvision: {Path(path).name})"
    # No data location travels with these weights: ablate needs --data-folder.
    data = {"class_path": DATA, "init_args": {"path": None, "num_workers": 2}}
    return path, label, model, data
