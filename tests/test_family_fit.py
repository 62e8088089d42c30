"""`fit`, resume, DDP and the depth sweep for the ViT and ConvNeXt families, with their recipes."""

import csv
from pathlib import Path

import pytest
import torch
import yaml
from optuna.trial import TrialState

from resnet_lab.module import ResNetClassifier
from resnet_lab.sweep.cli import main as sweep_main
from resnet_lab.train import cli_main

from .conftest import REPO, TINY, load, one_message
from .test_fit import ddp_probe, only_run_dir

VIT = str(REPO / "sweeps" / "vit.yaml")
CONVNEXT = str(REPO / "sweeps" / "convnext.yaml")
SMALL_VIT = ["--model.depth", "1", "--model.width", "32", "--model.heads", "2", "--model.mlp_dim", "64",
             "--model.patch_size", "8"]  # fmt: skip
SMALL_CNX = ["--model.arch", "cifar_convnext", "--model.stage_depths", "[1, 1, 1, 1]", "--model.widths",
             "[8, 8, 16, 16]"]  # fmt: skip


def args_for(tmp_path, config, *extra, steps=6):
    return ["fit", "--config", config, "--data.init_args.source", "synthetic", "--data.init_args.val_size", "200",
            "--trainer.max_steps", str(steps), "--lr_scheduler.init_args.total_steps", "12",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "1", "--trainer.check_val_every_n_epoch", "1",
            "--run.root", str(tmp_path / "runs"), "--run.logger", "csv", *extra]  # fmt: skip


def test_the_recipes_are_the_familys_own():
    for path, lr in ((VIT, 1e-3), (CONVNEXT, 2e-3)):
        cfg = yaml.safe_load(Path(path).read_text())
        assert cfg["optimizer"]["class_path"] == "torch.optim.AdamW" and cfg["optimizer"]["init_args"]["lr"] == lr
        sched = cfg["lr_scheduler"]["init_args"]
        assert sched["anneal_strategy"] == "cos" and sched["pct_start"] == 0.05 and not sched["cycle_momentum"]
        assert sched["total_steps"] == cfg["trainer"]["max_steps"] and cfg["model"]["label_smoothing"] == 0.1
        data = cfg["data"]["init_args"]  # DeiT's / Liu et al.'s augmentation
        assert (data["randaugment"], data["randaugment_magnitude"], data["erasing"]) == (2, 9, 0.25)
        assert (data["mixup"], data["cutmix"]) == (0.8, 1.0)


def test_the_families_cpu_preset_trains_with_crop_and_flip_alone(tmp_path, capsys):
    preset = str(REPO / "sweeps" / "presets" / "families-cpu.yaml")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", VIT, "--config", preset, "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert (data["randaugment"], data["mixup"], data["cutmix"], data["erasing"]) == (0, 0.0, 0.0, 0.0)
    assert data["folder"].endswith("cifar10-jpeg.tar.gz") and data["batch_size"] == 128


@pytest.mark.slow
def test_vit_fit_resumes_where_it_stopped_and_rebuilds_from_its_checkpoint(tmp_path):
    cli = cli_main(args_for(tmp_path, VIT, *SMALL_VIT, "--run.checkpoint_every_n_steps", "3", steps=6))
    run = only_run_dir(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 6 and saved["hyper_parameters"]["spec"]["family"] == "vit"
    lr6 = cli.trainer.optimizers[0].param_groups[0]["lr"]
    cli = cli_main(
        args_for(tmp_path, VIT, *SMALL_VIT, "--ckpt_path", str(last), "--run.test_after_fit", "false", steps=9)
    )
    assert cli.trainer.global_step == 9 and only_run_dir(tmp_path) == run
    # The warm-up + cosine schedule continued from step 6: the lr equals a fresh one stepped 9 times.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=12, pct_start=0.05,
                                              anneal_strategy="cos", cycle_momentum=False, div_factor=100.0,
                                              final_div_factor=10.0)  # fmt: skip
    lrs = []
    for _ in range(9):
        opt.step(), ref.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lr6 == pytest.approx(lrs[5]) and cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lrs[8])
    with open(run / "csv" / "metrics.csv", newline="") as f:
        logged = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert logged == list(range(9))  # every step once, those before the resume included
    m = ResNetClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    assert m.spec.name == "vit1_i32_p8_w32_h2_m64" and m.hparams.label_smoothing == 0.1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), cli.model.eval()(x))


@pytest.mark.slow
def test_convnext_on_two_ddp_processes_stays_identical_and_evaluates_every_image_once(tmp_path):
    args = args_for(tmp_path, CONVNEXT, *SMALL_CNX, "--data.init_args.batch_size", "8",
                    "--data.init_args.val_size", "201", "--data.init_args.eval_batch_size", "50",
                    "--trainer.val_check_interval", "6", "--run.test_after_fit", "false", steps=6)  # fmt: skip
    ranks = ddp_probe(tmp_path, "ddp", args, devices=2)
    for k, v in ranks[0]["params"].items():  # stochastic depth draws differ per rank; the weights do not
        assert torch.equal(v, ranks[1]["params"][k]), k
    run = only_run_dir(tmp_path)
    single = ddp_probe(
        tmp_path, "single", ["validate", *args[1:], "--ckpt_path", str(run / "checkpoints" / "last.ckpt")], devices=1
    )[0]
    for key in ("val/error", "val/loss"):
        assert ranks[0]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-4), key


@pytest.mark.slow
def test_convnext_depth_sweep_runs_each_net_and_compares_depths(tmp_path):
    tiny = {**TINY, "trainer": {**TINY["trainer"], "max_steps": 2}, "lr_scheduler": {"init_args": {"total_steps": 2}},
            "sweep": {"root": str(tmp_path / "sweeps"), "study_name": "cnx", "seeds": [0, 1]}}  # fmt: skip
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny))
    assert sweep_main(["--config", CONVNEXT, "--config", str(cfg)]) == 0
    done = [t for t in load(tmp_path, "cnx").trials if t.state == TrialState.COMPLETE]
    nets = sorted((t.user_attrs["spec"]["plain"], sum(t.user_attrs["spec"]["stage_depths"])) for t in done)
    assert nets == [(False, 6), (False, 6), (False, 12), (False, 12), (True, 6), (True, 6), (True, 12), (True, 12)]
    plain = [t.user_attrs["spec"] for t in done if t.user_attrs["spec"]["plain"]]
    assert all(s["drop_path"] == 0.0 and s["layer_scale"] == 1.0 for s in plain)
    md = (tmp_path / "sweeps" / "cnx" / "summary" / "cells.md").read_text()
    rows = [ln for ln in md.split("## Depth comparisons")[1].splitlines() if ln.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| cifar_convnext_atto_dp0.1 − convnext_cifar_d1-1-3-1_w40-80-160-320_dp0.1",
        "| plain_cifar_convnext_atto − plain_convnext_cifar_d1-1-3-1_w40-80-160-320",
    ]
    assert all(" 2/2 " in r for r in rows)


@pytest.mark.parametrize(
    "config, extra, words",
    [
        (VIT, ["--model.arch", "swin_t"], ["unknown model 'swin_t'"]),
        (VIT, ["--model.patch_size", "5"], ["patch_size=5 does not divide image_size=32"]),
        (VIT, ["--model.heads", "5"], ["heads=5 does not divide width=192"]),
        (VIT, ["--model.depth", "0"], ["depth=0 must be a positive integer"]),
        (VIT, ["--model.shortcut", "B"], ["has no option(s) shortcut"]),
        (CONVNEXT, ["--model.arch", "cifar_convnext", "--model.stage_depths", "[2, 0, 2, 2]"], ["stage_depths[1]=0"]),
        (CONVNEXT, ["--model.arch", "plain_cifar_convnext_atto"], ["drop_path drops residual branches"]),
    ],
)
def test_bad_family_options_are_one_line(tmp_path, capsys, config, extra, words):
    from resnet_lab.cli import main

    assert main(args_for(tmp_path, config, *extra)) == 2
    one_message(capsys, *words)
    assert not (tmp_path / "runs").exists()
