"""Pre-activation ResNets (He et al. 2016) and stochastic depth (Huang et al. 2016)."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from resnet_lab.models import SpecError, create_model

from .conftest import trained_like


def _x(m, b=2):
    torch.manual_seed(3)
    s = 32 if m.spec.family == "cifar" else 64
    return torch.randn(b, 3, s, s)


@torch.no_grad()
def test_preact_basic_block_is_bn_relu_conv_then_add():
    m = trained_like("preact_resnet20")
    blk = m.get_block("layer1.1")
    h = torch.randn(2, 16, 32, 32)
    ref = blk.conv2(F.relu(blk.bn2(blk.conv1(F.relu(blk.bn1(h)))))) + h  # no ReLU after the addition
    torch.testing.assert_close(blk(h), ref, rtol=0, atol=0)
    # The stem is a bare conv; the head is final BN-ReLU -> pool -> fc.
    x = _x(m)
    stem = m.conv1(x)
    torch.testing.assert_close(m.forward_stem(x), stem, rtol=0, atol=0)
    hn = m.forward_blocks(stem)
    ref_logits = m.fc(F.relu(m.final_bn(hn)).mean((2, 3)))
    torch.testing.assert_close(m(x), ref_logits, rtol=1e-5, atol=1e-5)
    assert m.bn1 is None


@torch.no_grad()
def test_preact_projection_takes_the_preactivated_input():
    m = trained_like("preact_resnet164")
    blk = m.get_block("layer2.0")  # 64 -> 128 channels, stride 2, option B
    h = torch.randn(1, 64, 16, 16)
    a = F.relu(blk.bn1(h))
    branch = blk.conv3(F.relu(blk.bn3(blk.conv2(F.relu(blk.bn2(blk.conv1(a)))))))
    torch.testing.assert_close(blk(h), branch + blk.downsample(a), rtol=1e-5, atol=1e-5)
    with m.remove_blocks(["layer2.0"]):  # a removed downsampling block keeps its projection
        torch.testing.assert_close(blk(h), blk.downsample(a), rtol=0, atol=0)
    assert blk.removed_as == "conv1x1(relu(BN(x)))"


@pytest.mark.parametrize("name", ["preact_resnet20", "preact_resnet164", "preact_resnet18"])
@torch.no_grad()
def test_removed_preact_block_is_the_identity_bit_for_bit(name):
    m = trained_like(name, num_classes=10)
    x = _x(m)
    seen = {}
    same_shape = [b for b in m.block_names if b not in m.downsample_blocks]
    hooks = [
        m.get_block(b).register_forward_hook(lambda mod, inp, out, b=b: seen.__setitem__(b, (inp[0], out)))
        for b in same_shape
    ]
    with m.remove_blocks(same_shape):
        m(x)
    for h in hooks:
        h.remove()
    assert len(seen) == len(same_shape)
    for b, (inp, out) in seen.items():
        assert torch.equal(out, inp), b
    # The whole net with block i removed = the net that skips block i.
    i = m.block_names.index(same_shape[1])
    h = m.forward_until(x, i)
    with m.remove_blocks([same_shape[1]]):
        removed = m(x)
    torch.testing.assert_close(removed, m.forward_from(h, i + 1), rtol=0, atol=0)


@torch.no_grad()
def test_preact_option_a_downsample_removed_is_subsample_and_pad():
    m = trained_like("preact_resnet20")
    blk = m.get_block("layer3.0")
    h = torch.randn(1, 32, 16, 16)
    with m.remove_blocks(["layer3.0"]):
        y = blk(h)
    torch.testing.assert_close(y[:, :32], h[:, :, ::2, ::2], rtol=0, atol=0)
    assert (y[:, 32:] == 0).all()


def test_cifar_bottleneck_layout_and_names():
    m = create_model("preact_resnet164")
    assert m.spec.block == "bottleneck" and m.spec.layers == (18, 18, 18) and len(m.block_names) == 54
    assert m.spec.name == "preact_resnet164"
    basic = create_model("preact_resnet164_basic")  # the name reports print resolves back to the net
    assert basic.spec.layers == (27, 27, 27) and basic.spec.name == "preact_resnet164_basic"
    assert basic.spec.shortcut == "A" and create_model("preact_resnet56_bottleneck").spec.layers == (6, 6, 6)
    with pytest.raises(SpecError, match="'preact_resnet164' is block_type='bottleneck'"):
        create_model("preact_resnet164", block_type="basic")
    assert create_model("preact_resnet110").spec.name == "preact_resnet110"
    assert (
        create_model("cifar_preact_resnet", depth=29, block_type="bottleneck").spec.name == "preact_resnet29_bottleneck"
    )
    assert create_model("cifar_resnet", block_type="bottleneck", depth=29).spec.name == "resnet29_bottleneck"
    assert create_model("preact_resnet1001").spec.layers == (111, 111, 111)
    with pytest.raises(SpecError, match="9n\\+2"):
        create_model("cifar_preact_resnet", block_type="bottleneck", depth=30)
    with pytest.raises(SpecError, match="applies to CIFAR nets only"):
        create_model("imagenet_preact_resnet", depth=50, block_type="basic")
    with pytest.raises(SpecError, match="block_type"):
        create_model("preact_resnet20", block_type="wide")


@pytest.mark.slow
def test_models_command_lists_the_preact_nets():
    r = subprocess.run(
        [sys.executable, "-m", "resnet_lab.cli", "models", "--filter", "preact"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[1:]}
    assert {"preact_resnet110", "preact_resnet164", "preact_resnet1001", "preact_resnet200"} <= set(lines)
    assert lines["preact_resnet164"][2] == "1,703,258" and lines["preact_resnet164"][6] == "bottleneck"
    assert not any(n.startswith("resnet") for n in lines)


# -- stochastic depth --------------------------------------------------------------------


def test_survival_schedule_is_huangs_linear_rule():
    s = create_model("preact_resnet56", stochastic_depth="batch", survival_last=0.5).spec
    p = s.survival_probs()
    assert len(p) == 27
    assert p[-1] == pytest.approx(0.5) and p[0] == pytest.approx(1 - 0.5 / 27)
    steps = [a - b for a, b in zip(p, p[1:])]
    assert max(steps) - min(steps) < 1e-12 and steps[0] == pytest.approx(0.5 / 27)
    assert create_model("preact_resnet56").spec.survival_probs() == (1.0,) * 27


def _tiny(**kw):
    return create_model("cifar_preact_resnet", depth=14, base_width=2, **kw)


def _branch_counts(m, steps, batch=1):
    """How often each block's branch ran, over `steps` training forwards."""
    calls = dict.fromkeys(m.block_names, 0)
    for b in m.block_names:
        m.get_block(b).conv1.register_forward_hook(lambda *a, b=b: calls.__setitem__(b, calls[b] + 1))
    m.train()
    x = torch.randn(batch, 3, 8, 8)
    with torch.no_grad():
        for _ in range(steps):
            m(x)
    return calls


@pytest.mark.slow
def test_per_batch_drops_follow_the_schedule():
    torch.manual_seed(0)
    m = _tiny(stochastic_depth="batch", survival_last=0.3)
    steps = 4000
    calls = _branch_counts(m, steps)
    for b, p in zip(m.block_names, m.spec.survival_probs()):
        sd = (p * (1 - p) / steps) ** 0.5
        assert abs(calls[b] / steps - p) < 4 * sd + 1e-3, (b, calls[b] / steps, p)
    # The schedule is visible: the last block runs far less often than the first.
    assert calls[m.block_names[-1]] < 0.45 * steps < 0.85 * steps < calls[m.block_names[0]]


def test_per_sample_drops_follow_the_schedule():
    torch.manual_seed(0)
    m = _tiny(stochastic_depth="sample", survival_last=0.4).train()
    kept = {b: [] for b in m.block_names}

    def hook(mod, inp, out, b):
        diff = (out - mod.shortcut(inp[0])).flatten(1).abs().sum(1)  # 0 where the branch was dropped
        kept[b].append((diff > 0).float())

    for b in m.block_names:
        m.get_block(b).register_forward_hook(lambda mod, i, o, b=b: hook(mod, i, o, b))
    with torch.no_grad():
        for _ in range(20):
            m(torch.randn(200, 3, 8, 8))
    for b, p in zip(m.block_names, m.spec.survival_probs()):
        frac = torch.cat(kept[b]).mean().item()
        assert abs(frac - p) < 4 * (p * (1 - p) / 4000) ** 0.5 + 1e-3, (b, frac, p)


@torch.no_grad()
def test_eval_uses_the_branch_in_expectation_deterministically():
    torch.manual_seed(0)
    sd = trained_like("cifar_preact_resnet", depth=14, stochastic_depth="batch", survival_last=0.5)
    # The same weights without stochastic depth, each branch's last conv scaled by p_l:
    # F is linear in that conv, so this net computes exactly p_l * F(x) + x.
    ref = copy.deepcopy(sd)
    for blk, p in zip(ref.blocks, sd.spec.survival_probs()):
        blk.survival = 1.0
        blk.conv2.weight.mul_(p)
    x = _x(sd, 4)
    a, b = sd(x), sd(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref(x), rtol=1e-5, atol=1e-5)
    plain_eval = copy.deepcopy(sd)
    for blk in plain_eval.blocks:
        blk.survival = 1.0
    assert not torch.allclose(a, plain_eval(x), atol=1e-3)  # the scale matters


def test_active_blocks_trains_on_exactly_k_branches():
    torch.manual_seed(0)
    m = _tiny(active_blocks=2)
    per_step = []
    for b in m.block_names:
        m.get_block(b).conv1.register_forward_hook(lambda *a: per_step.__setitem__(-1, per_step[-1] + 1))
    m.train()
    with torch.no_grad():
        for _ in range(300):
            per_step.append(0)
            m(torch.randn(1, 3, 8, 8))
    assert set(per_step) == {2}
    assert m.spec.survival_probs() == (2 / 6,) * 6 and m.spec.name == "preact_resnet14_active2"
    assert [b.survival for b in m.blocks] == [2 / 6] * 6  # the test-time scale


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="plain20", stochastic_depth="batch"), "plain net has no skip"),
        (dict(name="preact_resnet20", stochastic_depth="layer"), "unknown stochastic_depth"),
        (dict(name="preact_resnet20", stochastic_depth="batch", survival_last=0.0), r"survival_last must be in"),
        (dict(name="preact_resnet20", active_blocks=0), "active_blocks must be an int in 1..9"),
        (dict(name="preact_resnet20", active_blocks=10), "active_blocks must be an int in 1..9"),
        (dict(name="preact_resnet20", active_blocks=3, stochastic_depth="batch"), "not both"),
    ],
)
def test_bad_stochastic_depth_specs(kwargs, match):
    with pytest.raises(SpecError, match=match):
        create_model(**kwargs)


@torch.no_grad()
def test_preact_responses_are_the_3x3_conv_outputs():
    m = trained_like("preact_resnet20")
    layers = m.response_layers()
    assert [n for n, _ in layers][:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"] and len(layers) == 1 + 9 * 2
    x = _x(m, 4)
    stds = m.response_stds(x)
    blk = m.get_block("layer2.1")
    h = m.forward_until(x, m.block_names.index("layer2.1"))
    assert stds["layer2.1.conv1"] == pytest.approx(blk.conv1(F.relu(blk.bn1(h))).std().item(), rel=1e-5)


@pytest.mark.slow
def test_stochastic_depth_lives_in_the_checkpoint_and_lesions_run_unchanged(tmp_path):
    from resnet_lab.ablation import load_checkpoint
    from resnet_lab.ablation.cli import main as ablate_main
    from resnet_lab.train import cli_main

    from .conftest import fit_args

    sd = ["--model.stochastic_depth", "sample", "--model.survival_last", "0.7"]
    arch = ["--model.arch", "cifar_preact_resnet", "--model.depth", "8"]
    cli_main(fit_args(tmp_path, *arch, *sd, "--run.test_after_fit", "false", logger="none"))
    (ckpt,) = (tmp_path / "runs" / "preact_resnet8_sd0.7s").glob("*/checkpoints/last.ckpt")
    loaded = load_checkpoint(ckpt)
    assert (loaded.spec.stochastic_depth, loaded.spec.survival_last, loaded.spec.preact) == ("sample", 0.7, True)
    assert [b.survival for b in loaded.model.blocks] == pytest.approx([1 - 0.3 / 3, 1 - 0.6 / 3, 0.7])
    out = tmp_path / "rep"
    assert ablate_main([str(ckpt), "--out", str(out), "--studies", "single", "--limit", "40", "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())
    intact = next(r for r in rows if r["key"] == "intact")
    assert intact["n"] == 40 and len(rows) == 1 + 3
