"""Model zoo: exact sizes, equivalences and surgery, parametrized over the registry."""

import pytest
import torch
import torchvision

from resnet_lab.models import (
    ResNetSpec,
    SpecError,
    build,
    count_macs,
    count_params,
    create_model,
    list_models,
    load_torchvision_weights,
    model_meta,
    paper_error,
    resolve_spec,
)

# The exact counts live once, in the registry's metadata (`model_meta`); each is checked
# against the network built here. Pre-activation CIFAR basic nets keep the post-activation
# counts; He et al. 2016 give ~1.7M (164) and ~10.2M (1001).
EXPECTED = {n: model_meta(n).params for n in list_models() if model_meta(n)}
# Big nets run forward/backward at a reduced size/width to keep the suite fast;
# their exact counts are still checked at full size above.
SLOW = {"resnet1202", "resnet101", "resnet152", "preact_resnet1001", "preact_resnet101", "preact_resnet152",
        "preact_resnet200", "vit_b_16", "vit_b_32", "vit_l_16", "convnext_small", "convnext_base",
        "convnext_large"}  # fmt: skip
# What shrinks each family's big nets for a forward pass (every block still runs).
SMALL = {"vit": dict(image_size=32, width=64, heads=4, mlp_dim=128), "convnext": dict(widths=(8, 16, 32, 64))}


def small_input(model, batch=2):
    spec = model.spec
    size = spec.image_size if spec.family == "vit" else 32 if spec.input_size == 32 else 64
    return torch.randn(batch, 3, size, size)


def test_every_specific_name_has_its_facts():
    generic = {"cifar_resnet", "imagenet_resnet", "cifar_preact_resnet", "imagenet_preact_resnet", "cifar_vit",
               "cifar_convnext"}  # fmt: skip
    assert set(EXPECTED) == set(list_models()) - generic
    # Independent anchors: He et al. Table 6 rounds the CIFAR nets to 0.27M .. 19.4M; torchvision's own nets.
    paper_m = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7,
               "resnet1202": 19.4}  # fmt: skip
    for name, m in paper_m.items():
        assert round(EXPECTED[name] / 1e6, 2 if m < 1 else 1) == m
    for depth in (18, 34, 50):
        assert EXPECTED[f"resnet{depth}"] == count_params(getattr(torchvision.models, f"resnet{depth}")())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_param_counts_and_macs(name):
    model = create_model(name)
    assert count_params(model) == model_meta(name).params
    assert count_macs(model) == model_meta(name).macs


def test_paper_errors_only_for_the_registered_architecture():
    assert model_meta("resnet56").paper.error == 6.97 and "Table 6" in model_meta("resnet56").paper.source
    assert model_meta("plain56").paper is None  # He et al. show plain CIFAR nets only as curves
    assert paper_error(create_model("resnet110").spec).error == 6.43
    assert paper_error(create_model("preact_resnet1001").spec).error == 4.92
    # A variant is not the paper's net: no number is borrowed for it.
    assert paper_error(create_model("resnet56", shortcut="B").spec) is None
    assert paper_error(create_model("resnet56", num_classes=100).spec) is None
    assert paper_error(create_model("cifar_resnet", depth=56).spec).error == 6.97  # the same net by its generic name
    assert paper_error(create_model("cifar_resnet", depth=74).spec) is None  # no such row in the paper


@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("plain") and n[5:].isdigit()])
def test_plain_twin_has_same_count_as_option_a(name):
    twin = "resnet" + name[len("plain") :]
    spec = create_model(twin).spec
    expected = count_params(create_model(twin, shortcut="A")) if spec.family == "imagenet" else EXPECTED[twin]
    assert count_params(create_model(name)) == expected


@pytest.mark.parametrize("name", [n for n in list_models() if n not in SLOW])
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = small_input(model)
    y = model(x)
    assert y.shape == (2, 7)
    y.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", sorted(SLOW))
def test_forward_big_nets(name):
    # Full depth, small width: every block still runs.
    spec = resolve_spec(name)
    small = SMALL.get(spec.family, {"base_width": 4 if "1202" in name else 8})
    model = build(spec.replace(num_classes=3, **small))
    with torch.no_grad():
        assert model(small_input(model, 1)).shape == (1, 3)


def test_option_a_adds_no_parameters():
    for depth in (20, 56):
        a = create_model(f"resnet{depth}", shortcut="A")
        assert count_params(a) == count_params(create_model(f"plain{depth}"))
        # A/B/C ordering of sizes: A < B < C.
        b, c = create_model(f"resnet{depth}", shortcut="B"), create_model(f"resnet{depth}", shortcut="C")
        assert count_params(a) < count_params(b) < count_params(c)
        shortcut_params = [p for n, p in a.named_parameters() if "downsample" in n]
        assert shortcut_params == []


def test_option_a_shortcut_is_subsample_and_zero_pad():
    model = create_model("resnet20")
    blk = model.get_block("layer2.0")
    x = torch.randn(1, 16, 8, 8)
    y = blk.shortcut(x)
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert (y[:, 16:] == 0).all()


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_weight_equivalence(depth):
    torch.manual_seed(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    # Non-trivial BN statistics, so that a mis-mapped buffer would show.
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    ours = load_torchvision_weights(create_model(f"resnet{depth}"), tv.state_dict()).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)


def test_torchvision_weights_refuse_mismatch():
    sd = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(SpecError, match="shortcut='B'"):
        load_torchvision_weights(create_model("resnet18", shortcut="A"), sd)
    with pytest.raises(SpecError, match="num_classes=1000"):
        load_torchvision_weights(create_model("resnet18", num_classes=10), sd)
    with pytest.raises(SpecError, match="different depth"):
        load_torchvision_weights(create_model("resnet34"), sd)


def test_stride_placement_switch():
    v15 = create_model("resnet50")
    caffe = create_model("resnet50", stride_on="1x1")
    assert v15.layer2[0].conv2.stride == (2, 2) and v15.layer2[0].conv1.stride == (1, 1)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert count_params(v15) == count_params(caffe)


def test_generic_depths():
    assert len(create_model("cifar_resnet", depth=74).block_names) == 36
    assert create_model("cifar_resnet", depth=8).spec.layers == (1, 1, 1)
    assert create_model("imagenet_resnet", depth=200).spec.layers == (3, 24, 36, 3)


def test_zero_init_residual():
    m = create_model("resnet20", zero_init_residual=True).eval()
    assert all((b.bn2.weight == 0).all() for b in m.blocks)
    # Every block starts as identity, so removing any block changes nothing.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), m.remove_blocks(["layer1.1", "layer3.2"]):
        removed = m(x)
    torch.testing.assert_close(removed, m(x).detach())
    with pytest.raises(SpecError, match="plain"):
        create_model("plain20", zero_init_residual=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="resnet21"), "unknown model 'resnet21'.*Did you mean"),
        (dict(name="cifar_resnet", depth=21), "6n\\+2"),
        (dict(name="resnet20", depth=56), "'resnet20' is depth=20, but depth=56 was given.*'resnet56'"),
        (dict(name="imagenet_resnet", depth=40), r"ImageNet depth must be one of \[10, 18"),
        (dict(name="resnet20", shortcut="D"), "unknown shortcut option 'D'.*'A'"),
        (dict(name="resnet50", stride_on="5x5"), "stride_on"),
        (dict(name="resnet20", widht=3), "has no option.*widht.*its options"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(SpecError, match=match):
        create_model(**kwargs)


def test_spec_roundtrip_and_none_overrides():
    spec = create_model("resnet56", shortcut="B").spec
    assert ResNetSpec.from_dict(spec.to_dict()) == spec
    # None overrides keep the registry default (CLI defaults never clobber).
    assert create_model("plain20", plain=None, depth=None).spec.plain is True


def test_registering_a_taken_name_is_refused():
    # Issue 26 §D: a duplicate silently replaced the first registration (torchvision raises).
    from resnet_lab.models.registry import _REGISTRY, register_model

    before = _REGISTRY["resnet20"]()
    with pytest.raises(ValueError, match="'resnet20' is already registered"):
        register_model("resnet20", family="cifar", depth=20, plain=True)
    assert _REGISTRY["resnet20"]() == before and not before.plain


@pytest.mark.parametrize("name", list_models())
def test_each_spec_says_whether_its_net_has_batchnorm(name):
    """spec.BATCHNORM decides whether BN statistics exist to re-estimate (ablate's --bn-recalib,
    the landscape's recalibrated mode, an init: net's settled statistics): it must be the net's truth."""
    with torch.device("meta"):
        model = create_model(name)
    has = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.spec.BATCHNORM is has
