"""The study context (Study.run(ctx)): resumable units, the checkpoint's loss, perturbable
weights that leave the shared model alone, and untrained networks (init:ARCH)."""

import json

import pytest
import torch
import torch.nn.functional as F

from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.context import Context
from resnet_lab.ablation.runner import Store, build_datamodule, load_checkpoint, load_checkpoints, manifest_for
from resnet_lab.ablation.studies import REGISTRY, StudyOptions

from .conftest import fit_args, one_message, settle_bn_by_hand


def context(ckpt_path, tmp_path, study="single", **opts):
    ckpt = load_checkpoint(ckpt_path)
    dm = build_datamodule(ckpt.data, augment=False, eval_batch_size=50, batch_size=50)
    dm.setup("test")
    o = StudyOptions(studies=(study,), **opts)
    store = Store(tmp_path / "out", manifest_for([ckpt], o.asked()), False)
    return Context(REGISTRY[study], ckpt, dm, store, o), store


def test_a_unit_runs_once_and_is_stored_only_when_it_finishes(two_checkpoints, tmp_path):
    ctx, store = context(two_checkpoints[0], tmp_path)
    with pytest.raises(RuntimeError):
        for rows in ctx.unit("u"):
            rows.append(ctx.row(key="a"))
            raise RuntimeError("killed mid-unit")
    assert not ctx.done("u") and not (tmp_path / "out" / "results.jsonl").exists()
    ran = 0
    for rows in ctx.unit("u"):
        ran += 1
        rows.append(ctx.row(key="a", value=1.0))
    for _rows in ctx.unit("u"):  # done: the body does not run again
        ran += 1
    assert ran == 1 and ctx.done("u")
    (line,) = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    rec = json.loads(line)
    assert rec["unit"].endswith("|single|u|eval-bn") and rec["rows"][0]["value"] == 1.0
    assert rec["rows"][0]["study"] == "single" and rec["rows"][0]["condition"] == "eval-bn"
    # A new process (a rerun) sees it done too.
    again, _ = context(two_checkpoints[0], tmp_path)
    assert again.done("u") and not again.done("u", bn="recalibrated")
    with pytest.raises(ValueError, match="BN mode"):
        again.done("u", bn="train")


def test_the_study_gets_its_own_typed_options_and_the_common_ones(two_checkpoints, tmp_path):
    ctx, _ = context(two_checkpoints[0], tmp_path, study="k", k_max=3, seed=7)
    assert type(ctx.options).__name__ == "Options" and ctx.options.k_max == 3
    assert ctx.common.seed == 7 and not hasattr(ctx.options, "seed") and not hasattr(ctx.common, "k_max")


def test_perturbed_weights_leave_the_shared_model_alone(two_checkpoints, tmp_path):
    ctx, _ = context(two_checkpoints[0], tmp_path)
    x, y = next(iter(ctx.batches()))
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    f, params = ctx.functional(), ctx.parameters()
    with torch.no_grad():
        assert torch.allclose(f(params, x), ctx.model(x), atol=1e-6)
        for p in params.values():
            p.add_(torch.randn_like(p))
        moved = f(params, x)
        assert not torch.allclose(moved, ctx.model(x), atol=1e-3)
        ref = ctx.scratch()  # the same weights set explicitly on a copy
        for name, p in ref.named_parameters():
            p.copy_(params[name])
        assert torch.allclose(moved, ref(x), atol=1e-5)
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in before.items())


def test_the_checkpoint_loss_is_its_training_loss_with_label_smoothing(tmp_path):
    from resnet_lab.train import cli_main

    cli_main(fit_args(tmp_path, "--model.label_smoothing", "0.2", "--run.test_after_fit", "false", steps=2))
    (path,) = (tmp_path / "runs").glob("*/*/checkpoints/last.ckpt")
    ctx, _ = context(path, tmp_path)
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert ctx.ckpt.label_smoothing == 0.2
    assert torch.allclose(ctx.loss(logits, y), F.cross_entropy(logits, y, label_smoothing=0.2))
    assert not torch.allclose(ctx.loss(logits, y), F.cross_entropy(logits, y))


@pytest.mark.parametrize("value, word", [("1.0", "[0, 1)"), ("-0.1", "[0, 1)"), ("nan", "nan")])
def test_a_label_smoothing_outside_0_1_is_one_line(tmp_path, capsys, value, word):
    from resnet_lab.cli import main

    assert main(fit_args(tmp_path, "--model.label_smoothing", value)) == 2
    one_message(capsys, "label_smoothing", word)


def test_init_builds_a_seeded_untrained_net_that_never_pools_with_trained_ones(two_checkpoints):
    a, b, c, d = load_checkpoints(["init:resnet14", "init:resnet14@1", "init:plain14@0", two_checkpoints[0]], seed=0)
    assert a.init and a.label == "resnet14 (init, seed 0)" and a.arch.endswith("(init)")
    assert load_checkpoint("init:resnet14@0").model.state_dict()["fc.weight"].equal(a.model.state_dict()["fc.weight"])
    assert not b.model.state_dict()["fc.weight"].equal(a.model.state_dict()["fc.weight"])
    assert c.spec.plain and not d.init and d.arch != a.arch and d.spec.name == a.spec.name


def test_init_runs_beside_trained_checkpoints_on_their_data(two_checkpoints, tmp_path):
    out = tmp_path / "r"
    argv = ["init:resnet14", two_checkpoints[0], "--out", str(out), "--studies", "single", "--no-progress"]
    assert ablate_main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    init = [r for r in rows if r["checkpoint"] == "resnet14 (init, seed 0)"]
    intact = next(r for r in init if r["key"] == "intact")
    assert intact["n"] == 500 and intact["error"] > 50  # untrained: about chance on 10 classes
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"init": "init:resnet14@0"} in manifest["checkpoints"]
    # By hand: the seeded net, its BN statistics estimated on 1,000 seeded training images as
    # its first training batches would (train mode, cumulative), then evaluated.
    from resnet_lab.models import ResNet, resolve_spec

    torch.manual_seed(0)
    model = ResNet(resolve_spec("resnet14"))
    dm = build_datamodule(load_checkpoint(two_checkpoints[0]).data, augment=False, eval_batch_size=500,
                          batch_size=500)  # fmt: skip
    dm.setup("test")
    settle_bn_by_hand(
        model, [dm.on_after_batch_transfer((x, None), 0)[0] for x, _ in dm.sample_dataloader("train", 1000, 0)]
    )
    with torch.no_grad():
        logits, ys = zip(*[(model(dm.on_after_batch_transfer((x, y), 0)[0]), y) for x, y in dm.test_dataloader()])
    logits, ys = torch.cat(logits), torch.cat(ys)
    assert intact["wrong"] == int((logits.argmax(1) != ys).sum())
    assert intact["loss"] == pytest.approx(F.cross_entropy(logits, ys).item(), rel=1e-5)


@pytest.mark.parametrize(
    "ref, words",
    [
        ("init:resnet21", ["init:resnet21", "unknown model"]),
        ("init:resnet20@x", ["seed after @", "init:resnet20@1"]),
        ("init:resnet20@4294967296", ["init:resnet20@4294967296", "from 0 to 4294967295"]),  # was a traceback
        ("init:resnet20 --seed -1", ["seed=-1", "from 0 to 4294967295"]),  # torch wrapped it; fit refuses it
        ("init:resnet20 --seed 99999999999999999999", ["from 0 to 4294967295"]),  # was a traceback
    ],
)
def test_init_with_a_bad_architecture_or_seed_is_one_line(tmp_path, capsys, ref, words):
    assert ablate_main([*ref.split(), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("resnet-lab ablate: error:") and all(w in line for w in words), line
    assert not (tmp_path / "o").exists()
