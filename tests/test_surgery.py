"""Reversible block surgery: removal, reordering, prefix hooks."""

import pytest
import torch

from resnet_lab.models import create_model, list_models, resolve_spec

from .conftest import trained_like as _trained_like

SMALL = ["resnet20", "plain20", "resnet18", "plain18", "resnet50"]


def trained_like(name, **kw):
    return _trained_like(name, num_classes=10, **kw)


def inputs(m, b=3):
    torch.manual_seed(1)
    return torch.randn(b, 3, 32 if m.spec.family == "cifar" else 64, 32 if m.spec.family == "cifar" else 64)


@pytest.mark.parametrize("name", SMALL)
@torch.no_grad()
def test_remove_nothing_equals_forward(name):
    m = trained_like(name)
    x = inputs(m)
    ref = m(x)
    with m.remove_blocks(set()):
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
@torch.no_grad()
def test_removing_a_zero_branch_changes_nothing(name, shortcut):
    m = trained_like(name, shortcut=shortcut)
    x = inputs(m)
    for block in ["layer1.1", "layer2.0", "layer3.0", m.block_names[-1]]:
        # Make the block's residual branch output exactly zero (last BN gamma=beta=0).
        bn = m.get_block(block).branch_bns[-1]
        bn.weight.zero_()
        bn.bias.zero_()
        ref = m(x)
        with m.remove_blocks([block]):
            torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
@torch.no_grad()
def test_removal_changes_output_and_is_undone(name):
    m = trained_like(name)
    x = inputs(m)
    ref = m(x)
    names = m.block_names[1:3]
    with m.remove_blocks(names) as same:
        assert same is m
        assert [b.removed for b in m.blocks[1:3]] == [True, True]
        assert not torch.allclose(m(x), ref)
    assert not any(b.removed for b in m.blocks)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    # Restored after an exception too.
    with pytest.raises(RuntimeError), m.remove_blocks(names):
        raise RuntimeError
    assert not any(b.removed for b in m.blocks)


@torch.no_grad()
def test_removed_block_is_its_shortcut():
    m = trained_like("resnet20")
    x = inputs(m)
    pos = m.block_names.index("layer2.0")  # downsampling: option A subsample + pad
    h = m.forward_until(x, pos)
    with m.remove_blocks(["layer2.0"]):
        out = m.forward_blocks(h, pos, pos + 1)
    assert out.shape == (3, 32, 16, 16)
    torch.testing.assert_close(out[:, :16], h[:, :, ::2, ::2])
    assert (out[:, 16:] == 0).all()
    # Same-shape block removed: identity.
    pos = m.block_names.index("layer2.1")
    h = m.forward_until(x, pos)
    with m.remove_blocks(["layer2.1"]):
        torch.testing.assert_close(m.forward_blocks(h, pos, pos + 1), h, rtol=0, atol=0)


@torch.no_grad()
def test_plain_removal_is_identity_or_option_a():
    m = trained_like("plain20")
    x = inputs(m)
    for name in m.block_names:
        pos = m.block_names.index(name)
        h = m.forward_until(x, pos)
        with m.remove_blocks([name]):
            out = m.forward_blocks(h, pos, pos + 1)
        if name in m.downsample_blocks:
            torch.testing.assert_close(out[:, : h.shape[1]], h[:, :, ::2, ::2])
        else:
            torch.testing.assert_close(out, h, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet18"])
@torch.no_grad()
def test_prefix_hooks_compose_to_forward(name):
    m = trained_like(name)
    x = inputs(m)
    ref = m(x)
    for pos in range(len(m.block_names) + 1):
        torch.testing.assert_close(m.forward_from(m.forward_until(x, pos), pos), ref, rtol=1e-6, atol=1e-6)
    # Prefix reuse equals a full forward with the block removed.
    for pos, block in enumerate(m.block_names):
        h = m.forward_until(x, pos)
        with m.remove_blocks([block]):
            torch.testing.assert_close(m.forward_from(h, pos), m(x), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_reorder():
    m = trained_like("resnet20")
    x = inputs(m)
    ref = m(x)
    names = m.block_names
    assert m.swappable_groups() == [
        ["layer1.0", "layer1.1", "layer1.2"],
        ["layer2.1", "layer2.2"],
        ["layer3.1", "layer3.2"],
    ]
    swapped = list(names)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with m.reorder_blocks(swapped):
        assert [b for b in m.blocks] == [m.get_block(n) for n in swapped]
        out = m(x)
        # Manual composition in the swapped order.
        h = m.forward_stem(x)
        for n in swapped:
            h = m.get_block(n)(h)
        torch.testing.assert_close(out, m.forward_head(h), rtol=0, atol=0)
    assert not torch.allclose(out, ref)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    with m.reorder_blocks(names):
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    bad = list(names)
    bad[0], bad[3] = bad[3], bad[0]  # layer2.0 downsamples: cannot run first
    with pytest.raises(ValueError, match="cannot run at position 0"), m.reorder_blocks(bad):
        pass
    with pytest.raises(ValueError, match="permutation"), m.reorder_blocks(names[:-1]):
        pass


def test_unknown_block_name():
    m = create_model("resnet20")
    with pytest.raises(KeyError, match="unknown block name 'layer4.0'.*layer1.0 ... layer3.2"):
        with m.remove_blocks(["layer4.0"]):
            pass


@pytest.mark.parametrize(
    "name", [n for n in list_models() if n != "resnet1202" and resolve_spec(n).family in ("cifar", "imagenet")]
)
def test_block_names_are_stable_module_paths(name):
    m = create_model(name)
    assert len(m.block_names) == sum(m.spec.layers)
    modules = dict(m.named_modules())
    assert all(modules[n] is m.get_block(n) for n in m.block_names)
    assert m.block_names == create_model(name).block_names


def test_reorder_swap_levels_per_depth_are_the_documented_ones():
    # Issue 24 §8: the docstring said "up to half the blocks" while resnet-56 got 16 and 32 swaps.
    from resnet_lab.ablation.studies import reorder
    from resnet_lab.models import create_model

    want = {"resnet8": (1,), "resnet14": (1, 2, 4), "resnet20": (1, 2, 4, 8), "resnet56": (1, 2, 4, 8, 16, 32),
            "resnet110": (1, 2, 4, 8, 16, 32)}  # fmt: skip
    for name, levels in want.items():
        blocks = len(create_model(name).block_names)
        assert reorder.swap_levels(blocks) == levels, name  # as the module docstring lists them
