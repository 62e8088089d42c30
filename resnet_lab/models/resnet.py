"""Residual and plain networks of He et al. 2015 and 2016, with reversible block surgery.

One `ResNet` class covers both families; the stem is what differs:
  CIFAR:    3x3 conv(16) -> 3 stages of n blocks (16/32/64, x4 for bottlenecks) -> GAP -> fc
  ImageNet: 7x7/2 conv(64) + 3x3/2 max-pool -> 4 stages (64..512 x expansion) -> GAP -> fc
Pre-activation nets (`spec.preact`, "Identity Mappings", 2016) use BN -> ReLU -> conv
blocks with nothing after the addition, no BN-ReLU in the stem, and one BN-ReLU
(`final_bn`) before the pool. Stochastic depth (Huang et al. 2016) sits on the branch.

Module names match torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`,
`fc`), so a torchvision state dict loads into the option-B v1.5 model as is.

Surgery (Veit et al. 2016) is a method of the model (`surgery.UnitNet`, shared by every family):
  - `block_names`: "layer1.0", "layer1.1", ... in forward order;
  - `with model.remove_blocks(names):` drops those blocks' residual branches;
  - `with model.reorder_blocks(names):` runs blocks in another shape-compatible order;
  - `forward_until(x, i)` / `forward_from(h, i)`: the input of block position i, and the
    logits from there on, so a lesion engine can reuse an unchanged prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import ResNetSpec, SpecError
from .surgery import UnitNet


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    # No bias: BN right after makes it redundant.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Option A: parameter-free shape adapter (He et al. Sec. 4.2, CIFAR).

    (B, Cin, H, W) -> (B, Cout, H/s, W/s): take every s-th pixel, then append
    Cout-Cin zero channels. Has no parameters and no buffers, which is why plainN
    and option-A resnetN have identical parameter counts.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cout < cin:
            raise SpecError(f"option A cannot shrink channels ({cin} -> {cout})")
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))  # pad dim 1 (channels) at the end
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zero_channels={self.pad}"


def make_shortcut(cin: int, cout: int, stride: int, option: str, plain: bool, preact: bool = False) -> nn.Module | None:
    """The block's shortcut mapping; None means identity.

    Plain blocks have no shortcut in their forward pass. They still get a
    parameter-free option-A mapping where shapes change, used only when the block
    is removed at test time (a removed plain downsampling block becomes
    subsample + zero-pad, since it has no learned mapping to fall back on).
    A pre-activation projection is a bare 1x1 conv (its input is already BN-ReLU'd,
    He et al. 2016); a post-activation one is conv + BN.
    """
    reshapes = stride != 1 or cin != cout
    if plain or option == "A":
        return ShortcutA(cin, cout, stride) if reshapes else None
    if option == "C" or reshapes:
        # Sequential(conv, bn) keeps torchvision's `downsample.0/.1` key names.
        if preact:
            return nn.Sequential(conv1x1(cin, cout, stride))
        return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    return None


class ResidualBlock(nn.Module):
    """y = merge(branch(x), shortcut(x)), the one definition every caller shares.

    Post-activation (He et al. 2015): y = relu(F(x) + shortcut(x)), or relu(F(x)) if plain.
    Pre-activation (He et al. 2016): y = F(x) + shortcut(x), F starting with BN -> ReLU.

    When removed: y = merge(0, shortcut(x)), i.e. exactly the forward pass with the
    residual branch outputting zero. Post-activation block inputs are post-ReLU
    (>= 0), so for identity and option-A shortcuts this is y = shortcut(x) bit for
    bit; for B/C projections the ReLU after the addition is kept. A removed
    pre-activation identity block returns its input tensor itself: y = x.

    Stochastic depth: `survival` is the probability that the branch is used in a
    training batch and its scale at test time; `drop_mode` "batch" drops it for the
    whole batch (and skips computing it), "sample" per sample; None means the block
    never drops itself (the ResNet picks the active blocks for `active_blocks`).
    """

    preact = False

    def __init__(self, plain: bool) -> None:
        super().__init__()
        self.plain = plain
        self.removed = False  # toggled only by ResNet.remove_blocks
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        self.in_planes = self.out_planes = self.stride = 0
        self.survival = 1.0  # set by ResNet from spec.survival_probs()
        self.drop_mode: str | None = None

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch F(x) as trained, with no stochastic-depth scaling."""
        raise NotImplementedError

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def branch(self, x: Tensor) -> Tensor:
        """F(x) as the forward pass uses it: scaled by `survival` at test time
        (stochastic depth in expectation), masked per sample in training."""
        out = self.residual(x)
        if self.survival < 1.0:
            if not self.training:
                out = out * self.survival
            elif self.drop_mode == "sample":
                keep = torch.empty(out.shape[0], 1, 1, 1, device=out.device, dtype=out.dtype)
                out = out * keep.bernoulli_(self.survival)
        return out

    def merge(self, branch: Tensor | None, skip: Tensor) -> Tensor:
        """The block output from its two paths; branch None = removed (branch is 0)."""
        if branch is None:
            return skip if self.preact else torch.relu(skip)  # not inplace: skip may be a cached input
        if self.preact:
            return branch if self.plain else branch + skip
        return self.relu(branch if self.plain else branch + skip)

    def lesioned(self, x: Tensor) -> Tensor:
        return self.merge(None, self.shortcut(x))

    def forward(self, x: Tensor) -> Tensor:
        if self.removed:
            return self.lesioned(x)
        batch_drop = self.training and self.drop_mode == "batch" and self.survival < 1.0
        if batch_drop and float(torch.rand(())) >= self.survival:  # Huang et al.: the branch is not computed
            return self.lesioned(x)
        return self.merge(self.branch(x), None if self.plain else self.shortcut(x))

    @property
    def removed_as(self) -> str:
        """What the block computes when removed: 'identity', 'subsample+zero-pad'
        (option A or a plain downsampling block) or the kept B/C projection
        ('relu(BN(conv1x1(x)))' post-activation, 'conv1x1(relu(BN(x)))' pre-activation):
        a removed option-C block is not y = x."""
        if self.downsample is None:
            return "identity"
        if isinstance(self.downsample, ShortcutA):
            return "subsample+zero-pad"
        return "conv1x1(relu(BN(x)))" if self.preact else "relu(BN(conv1x1(x)))"

    @property
    def signature(self) -> tuple[int, int, int]:
        """(in channels, out channels, stride): blocks with equal signatures can swap."""
        return (self.in_planes, self.out_planes, self.stride)

    @property
    def branch_bns(self) -> list[nn.BatchNorm2d]:
        raise NotImplementedError

    @property
    def branch_output_layer(self) -> nn.Module:
        """The branch's last layer: zeroing its weight (and bias) zeroes F(x)."""
        return self.branch_bns[-1]


class BasicBlock(ResidualBlock):
    """Two 3x3 convs: (B, Cin, H, W) -> (B, planes, H/s, W/s)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, shortcut: str, plain: bool) -> None:
        super().__init__(plain)
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = make_shortcut(cin, planes, stride, shortcut, plain)
        self.in_planes, self.out_planes, self.stride = cin, planes, stride

    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    @property
    def branch_bns(self) -> list[nn.BatchNorm2d]:
        return [self.bn1, self.bn2]


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4): (B, Cin, H, W) -> (B, 4*planes, H/s, W/s).

    stride_on="3x3" is torchvision's v1.5 (better accuracy); "1x1" is the paper's
    Caffe v1, whose strided 1x1 skips 3/4 of the positions.
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, shortcut: str, plain: bool, stride_on: str = "3x3") -> None:
        super().__init__(plain)
        cout = planes * self.expansion
        s1, s3 = (stride, 1) if stride_on == "1x1" else (1, stride)
        self.conv1, self.bn1 = conv1x1(cin, planes, s1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, s3), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, cout), nn.BatchNorm2d(cout)
        self.downsample = make_shortcut(cin, cout, stride, shortcut, plain)
        self.in_planes, self.out_planes, self.stride = cin, cout, stride

    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    @property
    def branch_bns(self) -> list[nn.BatchNorm2d]:
        return [self.bn1, self.bn2, self.bn3]


class PreActBlock(ResidualBlock):
    """Shared by the pre-activation blocks: bn1 acts on the block input, and a B/C
    projection takes the BN-ReLU'd input (He et al. 2016's code, timm's ResNetV2);
    option A subsamples and pads the raw input, so the signal path stays clean."""

    preact = True

    def shortcut(self, x: Tensor) -> Tensor:
        if self.downsample is None or isinstance(self.downsample, ShortcutA):
            return super().shortcut(x)
        return self.downsample(self.relu(self.bn1(x)))

    @property
    def branch_output_layer(self) -> nn.Module:
        return self.convs[-1]


class PreActBasicBlock(PreActBlock):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3: (B, Cin, H, W) -> (B, planes, H/s, W/s)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, shortcut: str, plain: bool) -> None:
        super().__init__(plain)
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, planes, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv3x3(planes, planes)
        self.downsample = make_shortcut(cin, planes, stride, shortcut, plain, preact=True)
        self.in_planes, self.out_planes, self.stride = cin, planes, stride

    def residual(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        return self.conv2(self.relu(self.bn2(out)))

    @property
    def branch_bns(self) -> list[nn.BatchNorm2d]:
        return [self.bn1, self.bn2]

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2]


class PreActBottleneck(PreActBlock):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 (x4): (B, Cin, H, W) -> (B, 4*planes, H/s, W/s)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, shortcut: str, plain: bool, stride_on: str = "3x3") -> None:
        super().__init__(plain)
        cout = planes * self.expansion
        s1, s3 = (stride, 1) if stride_on == "1x1" else (1, stride)
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv1x1(cin, planes, s1)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv3x3(planes, planes, s3)
        self.bn3, self.conv3 = nn.BatchNorm2d(planes), conv1x1(planes, cout)
        self.downsample = make_shortcut(cin, cout, stride, shortcut, plain, preact=True)
        self.in_planes, self.out_planes, self.stride = cin, cout, stride

    def residual(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return self.conv3(self.relu(self.bn3(out)))

    @property
    def branch_bns(self) -> list[nn.BatchNorm2d]:
        return [self.bn1, self.bn2, self.bn3]

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2, self.conv3]


BLOCKS: dict[tuple[str, bool], type[ResidualBlock]] = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneck,
}


class ResNet(UnitNet):
    """A network built from a `ResNetSpec`. `model.spec` is kept for checkpoints."""

    def __init__(self, spec: ResNetSpec) -> None:
        super().__init__()
        self.spec = spec
        block_cls = BLOCKS[(spec.block, spec.preact)]
        w = spec.width
        if spec.family == "cifar":
            self.conv1 = conv3x3(spec.in_chans, w)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(spec.in_chans, w, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        # Pre-activation nets: the first block's BN-ReLU follows the stem conv, and one
        # BN-ReLU (final_bn) follows the last addition.
        self.bn1 = None if spec.preact else nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)

        cin, blocks, names = w, [], []
        for s, n in enumerate(spec.layers):
            planes = w * 2**s
            stage = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1  # downsample at each stage's first block
                extra = {"stride_on": spec.stride_on} if block_cls.expansion > 1 else {}
                blk = block_cls(cin, planes, stride, spec.shortcut, spec.plain, **extra)
                stage.append(blk)
                cin = blk.out_planes
                names.append(f"layer{s + 1}.{b}")
            self.add_module(f"layer{s + 1}", nn.Sequential(*stage))
            blocks += stage
        self.final_bn = nn.BatchNorm2d(cin) if spec.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, spec.num_classes)
        for blk, p in zip(blocks, spec.survival_probs()):
            blk.survival, blk.drop_mode = p, spec.stochastic_depth

        self._set_units(blocks, names, {})
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 ("Delving deep"): keeps forward variance through ReLUs.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.spec.zero_init_residual:
            for blk in self._blocks:
                nn.init.zeros_(blk.branch_output_layer.weight)

    # -- forward pieces -------------------------------------------------------
    def forward_stem(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, width, H', W'); H' = H (CIFAR) or H/4 (ImageNet)."""
        h = self.conv1(x)
        if self.bn1 is not None:
            h = self.relu(self.bn1(h))
        return self.maxpool(h)

    def forward_head(self, h: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, num_classes); pre-activation nets apply final BN-ReLU first."""
        if self.final_bn is not None:
            h = torch.relu(self.final_bn(h))  # not inplace: h may be a removed block's input
        return self.fc(torch.flatten(self.avgpool(h), 1))

    def _active_units(self) -> set[int] | None:
        """Veit et al.'s short-path training: the blocks whose branch runs in this batch."""
        if not (self.training and self.spec.active_blocks):
            return None
        return set(torch.randperm(len(self._blocks))[: self.spec.active_blocks].tolist())

    def batchnorms_after(self, position: int) -> list[nn.Module]:
        """The BNs whose inputs change when the block at `position` (current order)
        changes: those of that block and every later one, and a pre-activation net's
        final BN."""
        return super().batchnorms_after(position) + ([self.final_bn] if self.final_bn is not None else [])

    def response_layers(self) -> list[tuple[str, nn.Module]]:
        """The BN after every 3x3 conv, in forward order (He et al. Fig. 7 plots
        these responses: after BN, before the ReLU or the addition); for
        pre-activation nets, the 3x3 convs themselves."""
        if self.spec.preact:
            return self._preact_response_layers()
        out = [("conv1", self.bn1)] if self.spec.family == "cifar" else []
        for name, blk in zip(self._names, self._blocks):
            bns = blk.branch_bns if isinstance(blk, BasicBlock) else [blk.bn2]
            idx = (1, 2) if isinstance(blk, BasicBlock) else (2,)
            out += [(f"{name}.bn{i}", bn) for i, bn in zip(idx, bns)]
        return out

    def _preact_response_layers(self) -> list[tuple[str, nn.Module]]:
        # No BN follows a pre-activation conv inside its branch: the response of a 3x3
        # layer is the conv's own output (what is added to the stream, for the last one).
        out = [("conv1", self.conv1)] if self.spec.family == "cifar" else []
        for name, blk in zip(self._names, self._blocks):
            idx = (1, 2) if isinstance(blk, PreActBasicBlock) else (2,)
            out += [(f"{name}.conv{i}", getattr(blk, f"conv{i}")) for i in idx]
        return out

    @torch.no_grad()
    def response_stds(self, x: Tensor) -> dict[str, float]:
        """Std over all elements of each 3x3 layer's response to the batch x."""
        stds: dict[str, float] = {}
        hooks = [
            bn.register_forward_hook(lambda _m, _i, out, n=name: stds.__setitem__(n, out.float().std().item()))
            for name, bn in self.response_layers()
        ]
        try:
            self(x)
        finally:
            for h in hooks:
                h.remove()
        return stds

    def extra_repr(self) -> str:
        return f"spec={self.spec}"
