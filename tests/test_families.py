"""ViT and ConvNeXt: exact to torchvision, and every lesion checked against torchvision's own
network with the same change (a removed update is its branch's last layer zeroed there)."""

import copy
import itertools
import random

import pytest
import torch
import torchvision
from torchvision.models.convnext import CNBlockConfig

from resnet_lab.ablation import engine
from resnet_lab.models import SpecError, build, create_model, resolve_spec, spec_from_dict

TINY_VIT = dict(depth=3, image_size=32, patch_size=8, width=32, heads=4, mlp_dim=64)
TINY_CNX = dict(stage_depths=(1, 2, 2, 1), widths=(8, 16, 24, 32), stem="imagenet", layer_scale=0.5)


def tv_vit(**kw):
    return torchvision.models.VisionTransformer(
        image_size=kw["image_size"], patch_size=kw["patch_size"], num_layers=kw["depth"], num_heads=kw["heads"],
        hidden_dim=kw["width"], mlp_dim=kw["mlp_dim"], num_classes=10,
    )  # fmt: skip


def tv_convnext(**kw):
    d, w = kw["stage_depths"], kw["widths"]
    setting = [CNBlockConfig(w[i], w[i + 1] if i + 1 < len(w) else None, d[i]) for i in range(len(d))]
    return torchvision.models.convnext.ConvNeXt(setting, layer_scale=kw["layer_scale"], num_classes=10)


def randomised(tv):
    """torchvision's net with every parameter drawn at random (its zero head and 1e-6 layer
    scales would hide a wrong forward)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tv.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 3 and p.shape[1:] == (1, 1) else 0.0))
    return tv.eval()


def pair(tv, generic: str, kw: dict):
    """torchvision's net, randomised, and ours with its state dict (strict)."""
    tv = randomised(tv)
    ours = build(resolve_spec(generic).replace(**kw)).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv, ours


@pytest.fixture(scope="module")
def pair_vit():
    return pair(tv_vit(**TINY_VIT), "cifar_vit", TINY_VIT)


@pytest.fixture(scope="module")
def pair_convnext():
    return pair(tv_convnext(**TINY_CNX), "cifar_convnext", TINY_CNX)


def x_of(n=6, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", ["vit_b_16", "convnext_tiny"])
def test_torchvision_state_dict_gives_the_same_logits(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().eval()
    torch.nn.init.normal_(tv.heads.head.weight if name.startswith("vit") else tv.classifier[2].weight, std=0.02)
    ours = create_model(name).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = x_of(2, 224)
    with torch.no_grad():
        want = tv(x)
        assert want.abs().max() > 0.1
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)


def zero_branch(tv, unit: str):
    """In torchvision's net, make unit `unit` add exactly zero (its branch's last layer)."""
    if unit.startswith("layer"):
        i, kind = unit[5:].split(".")
        layer = tv.encoder.layers[int(i)]
        last = layer.self_attention.out_proj if kind == "attn" else layer.mlp[3]
        with torch.no_grad():
            last.weight.zero_(), last.bias.zero_()
    else:
        s, b = unit[5:].split(".")
        with torch.no_grad():
            tv.features[2 * int(s) - 1][int(b)].layer_scale.zero_()


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_every_lesion_equals_torchvision_with_the_branch_zeroed(family, request):
    tv, ours = request.getfixturevalue(f"pair_{family}")
    x = x_of()
    names = ours.block_names
    assert len(names) == (2 * TINY_VIT["depth"] if family == "vit" else sum(TINY_CNX["stage_depths"]))
    conds = (
        engine.single_block_conditions(ours) + engine.k_conditions(ours, 2, 6, 0) + engine.k_conditions(ours, 3, 4, 1)
    )
    got = engine.condition_logits(ours, x, conds)  # the prefix-sharing engine
    for c in conds:
        ref = copy.deepcopy(tv)
        for u in c.removed:
            zero_branch(ref, u)
        with torch.no_grad():
            torch.testing.assert_close(got[c.key], ref(x), atol=2e-5, rtol=1e-5, msg=c.key)
    assert all(c.meta["removed_as"] == "identity" for c in conds[1 : len(names) + 1])
    assert ours.downsample_blocks == []


def test_a_vit_layer_name_removes_both_of_its_updates(pair_vit):
    tv, ours = pair_vit
    ref = copy.deepcopy(tv)
    zero_branch(ref, "layer1.attn"), zero_branch(ref, "layer1.mlp")
    x = x_of()
    with torch.no_grad(), ours.remove_blocks(["layer1"]):
        torch.testing.assert_close(ours(x), ref(x), atol=2e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="unknown block name 'layer9'"):
        with ours.remove_blocks(["layer9"]):
            pass


def naive_vit(tv, x, units, plain=False):
    """A ViT forward written out from torchvision's modules, running `units` (layer, kind) in order."""
    h = tv._process_input(x)
    h = torch.cat([tv.class_token.expand(len(x), -1, -1), h], 1) + tv.encoder.pos_embedding
    for i, kind in units:
        layer = tv.encoder.layers[i]
        if kind == "attn":
            a = layer.ln_1(h)
            f = layer.self_attention(a, a, a, need_weights=False)[0]
        else:
            f = layer.mlp(layer.ln_2(h))
        h = f if plain else h + f
    return tv.heads(tv.encoder.ln(h)[:, 0])


def test_any_permutation_of_vit_updates_equals_the_written_out_forward(pair_vit):
    tv, ours = pair_vit
    assert ours.swappable_groups() == [ours.block_names]  # every update has the same shape
    x, rng = x_of(), random.Random(0)
    conds = engine.reorder_conditions(ours, 3, 4, 0)
    order = ours.block_names
    rng.shuffle(order)
    conds.append(engine.Condition("shuffled", order=tuple(order)))
    got = engine.condition_logits(ours, x, conds)
    with torch.no_grad():
        for c in conds:
            units = [(int(n[5:].split(".")[0]), n.split(".")[1]) for n in c.order]
            torch.testing.assert_close(got[c.key], naive_vit(tv, x, units), atol=2e-5, rtol=1e-5)


def test_convnext_reorders_within_a_stage_and_keeps_the_downsampling_in_place(pair_convnext):
    tv, ours = pair_convnext
    assert ours.swappable_groups() == [["stage2.0", "stage2.1"], ["stage3.0", "stage3.1"]]
    ref = copy.deepcopy(tv)
    ref.features[3] = torch.nn.Sequential(ref.features[3][1], ref.features[3][0])  # stage 2 swapped
    x = x_of()
    order = ["stage1.0", "stage2.1", "stage2.0", "stage3.0", "stage3.1", "stage4.0"]
    with torch.no_grad(), ours.reorder_blocks(order):
        torch.testing.assert_close(ours(x), ref(x), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot run at position"):
        with ours.reorder_blocks(["stage2.0", "stage1.0", "stage2.1", *order[3:]]):
            pass
    # forward_until(x, i) is unit i's input: after the stage's downsampling layer.
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_until(x, 1), tv.features[:3](x), atol=1e-5, rtol=1e-5)


def test_plain_nets_drop_every_addition(pair_vit, pair_convnext):
    tv, _ = pair_vit
    plain = build(resolve_spec("cifar_vit").replace(plain=True, **TINY_VIT)).eval()
    plain.load_state_dict(tv.state_dict())
    x = x_of()
    units = [(i, k) for i in range(TINY_VIT["depth"]) for k in ("attn", "mlp")]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), naive_vit(tv, x, units, plain=True), atol=2e-5, rtol=1e-5)
    tvc, _ = pair_convnext
    cnx = build(resolve_spec("cifar_convnext").replace(plain=True, **{**TINY_CNX, "layer_scale": 1.0})).eval()
    cnx.load_state_dict(tvc.state_dict())
    h = tvc.features[0](x)
    with torch.no_grad():
        for mod in tvc.features[1:]:
            for blk in mod if isinstance(mod[0], torchvision.models.convnext.CNBlock) else [mod]:
                h = blk.layer_scale * blk.block(h) if hasattr(blk, "layer_scale") else blk(h)
        torch.testing.assert_close(cnx(x), tvc.classifier(tvc.avgpool(h)), atol=2e-5, rtol=1e-5)


def test_names_resolve_back_to_their_nets():
    specs = [
        resolve_spec("cifar_vit", depth=3),
        resolve_spec("cifar_vit").replace(width=128, heads=4, mlp_dim=512, depth=8),
        resolve_spec("vit_b_16").replace(plain=True),
        resolve_spec("cifar_convnext", stage_depths=[1, 1, 3, 1]),
        resolve_spec("convnext_tiny").replace(drop_path=0.3, layer_scale=1e-5),
        resolve_spec("plain_cifar_convnext_atto"),
        resolve_spec("convnext_tiny").replace(plain=True, layer_scale=1.0, drop_path=0.0),
    ]
    for s in specs:
        back = resolve_spec(s.name).replace(num_classes=s.num_classes)
        assert back == s, s.name
        assert spec_from_dict(s.to_dict()) == s
    assert [s.name for s in specs[:2]] == ["cifar_vit3", "vit8_i32_p4_w128_h4_m512"]
    assert specs[3].name == "convnext_cifar_d1-1-3-1_w40-80-160-320" and specs[3].depth == 6
    assert specs[-1].name == "plain_convnext_tiny"  # a plain net's default drop path is 0, not the preset's


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: spec_from_dict({"family": "swin"}), "unknown family 'swin'; valid: cifar, imagenet.*vit, convnext"),
        (lambda: resolve_spec("cifar_vit", patch_size=5), "patch_size=5 does not divide image_size=32"),
        (lambda: resolve_spec("cifar_vit", heads=5), "heads=5 does not divide width=192"),
        (lambda: resolve_spec("cifar_vit", depth=0), "depth=0 must be a positive integer"),
        (lambda: resolve_spec("cifar_convnext", stage_depths=[2, 0, 2, 2]), r"stage_depths\[1\]=0 must be"),
        (lambda: resolve_spec("cifar_convnext", widths=[8, 16]), "widths has 2 entries but stage_depths 4"),
        (lambda: resolve_spec("cifar_convnext", plain=True), "plain ConvNeXt with layer_scale=1e-06"),
        (lambda: resolve_spec("cifar_vit6", depth=12), "model 'cifar_vit6' is depth=6.*'cifar_vit12'"),
        (lambda: resolve_spec("cifar_vit", shortcut="B"), "cifar_vit6 has no option.*shortcut.*its options"),
    ],
)
def test_bad_architectures_are_one_line(make, match):
    with pytest.raises(SpecError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_units_are_the_documented_names():
    vit, cnx = create_model("cifar_vit6"), create_model("cifar_convnext_atto")
    assert vit.block_names[:3] == ["layer0.attn", "layer0.mlp", "layer1.attn"] and len(vit.block_names) == 12
    stages = [n.split(".")[0] for n in cnx.block_names]
    assert [len(list(g)) for _, g in itertools.groupby(stages)] == [2, 2, 6, 2]
    # No unit is a module of its own in the state dict: the keys are torchvision's.
    assert not any("attn" in k for k in vit.state_dict())
