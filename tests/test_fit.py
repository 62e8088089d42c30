"""End-to-end `resnet-lab fit`: real data, W&B offline, resume after SIGKILL, DDP, bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnet_lab.module import CheckpointMismatchError, ResNetClassifier
from resnet_lab.schedules import PaperLR
from resnet_lab.train import OptionError, cli_main

from .conftest import CIFAR_ARCHIVE, DEPTH, REPO, TINY_IMAGENET, fit_args, need
from .wandb_offline import read_offline_run


def only_run_dir(tmp_path) -> Path:
    dirs = [p.parent for p in (tmp_path / "runs").glob("*/*/run.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
def test_fit_cifar_archive_subset(tmp_path, cache_dir):
    cli = cli_main(
        fit_args(
            tmp_path,
            "--data.init_args.source",
            "auto",
            "--data.init_args.folder",
            str(need(CIFAR_ARCHIVE)),
            "--data.init_args.download",
            "false",
            "--data.init_args.val_size",
            "500",
            "--data.init_args.train_subset",
            "512",
            "--data.init_args.eval_subset",
            "256",
            "--model.depth",
            "8",
            steps=4,
        )
    )
    assert cli.trainer.global_step == 4
    run = only_run_dir(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "config.yaml").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["spec"]["depth"] == 8 and ckpt["global_step"] == 4
    # A checkpoint alone rebuilds the network.
    model = ResNetClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert model.spec.name == "resnet8" and model.spec.num_classes == 10
    # The final weights were tested, and the best-by-val checkpoint apart.
    assert "test/error" in cli.test_metrics and cli.test_metrics["best_test/step"] == 4  # one epoch, one val


def test_fit_tiny_imagenet(tmp_path, cache_dir):
    cli = cli_main(
        [
            "fit",
            "--config",
            str(REPO / "sweeps" / "imagenet.yaml"),
            "--data.init_args.path",
            str(need(TINY_IMAGENET)),
            "--data.init_args.num_workers",
            "0",
            "--data.init_args.batch_size",
            "8",
            "--data.init_args.eval_batch_size",
            "50",
            "--data.init_args.scale",
            "[64, 72]",
            "--data.init_args.crop",
            "56",
            "--data.init_args.eval_resize",
            "64",
            "--model.arch",
            "resnet18",
            "--model.base_width",
            "8",
            "--model.shortcut",
            "A",
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.limit_test_batches",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--run.root",
            str(tmp_path / "runs"),
            "--run.logger",
            "none",
        ]
    )
    assert cli.trainer.global_step == 3
    assert cli.model.spec.num_classes == 10 and cli.model.spec.shortcut == "A"  # linked from the data


@pytest.mark.slow
def test_wandb_offline_run_has_val_metrics_and_config(tmp_path):
    cli_main(fit_args(tmp_path, "--model.depth", "8", "--seed_everything", "123", logger="wandb", steps=14))
    run = only_run_dir(tmp_path)
    for _ in range(40):  # wandb-core may still be flushing the last records after finish()
        rec = read_offline_run(run)
        history, config = {}, rec["config"]
        for row in rec["history"]:
            history.update(row)
        if "val/error" in history:
            break
        time.sleep(0.5)
    assert {"val/error", "val/acc", "val/acc5", "val/loss", "train/loss_step"} <= set(history)
    assert 0 <= history["val/error"] <= 100 and abs(history["val/error"] + history["val/acc"] - 100) < 1e-3
    assert config["model.depth"] == 8 and config["spec.depth"] == 8 and config["seed"] == 123
    assert config["optimizer.init_args.lr"] == 0.1 and config["git_commit"]
    assert json.loads((run / "run.json").read_text())["seed"] == 123


@pytest.mark.slow
def test_second_run_does_not_collide(tmp_path):
    # Lightning's default config saving fails on the 2nd run with a shared log dir.
    for _ in range(2):
        cli_main(fit_args(tmp_path, "--model.depth", "8", "--run.name", "same", logger="wandb", steps=2))
    assert len(list((tmp_path / "runs" / "same").glob("*/config.yaml"))) == 2


@pytest.mark.slow
def test_sigkill_then_resume_continues_at_saved_step(tmp_path):
    args = fit_args(tmp_path, "--model.depth", "8", "--run.checkpoint_every_n_steps", "5", steps=400)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_lab.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    last = None
    while time.time() < deadline:
        found = list((tmp_path / "runs").glob("*/*/checkpoints/last.ckpt"))
        if found and torch.load(found[0], weights_only=False)["global_step"] >= 15:
            last = found[0]
            break
        assert proc.poll() is None, "fit ended before it could be killed"
        time.sleep(0.5)
    assert last is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(last, weights_only=False)
    step = saved["global_step"]
    assert step % 5 == 0  # at most checkpoint_every_n_steps lost
    sched = saved["lr_schedulers"][0]
    assert sched["last_epoch"] == step  # the schedule counts iterations
    cli = cli_main(fit_args(tmp_path, "--model.depth", "8", "--ckpt_path", str(last), steps=step + 3))
    assert cli.trainer.global_step == step + 3
    assert only_run_dir(tmp_path) == last.parent.parent  # same run directory
    assert cli.trainer.lr_scheduler_configs[0].scheduler.last_epoch == step + 3
    # The CSV history is complete: every step once, those before the kill included.
    with open(last.parent.parent / "csv" / "metrics.csv", newline="") as f:
        logged = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert logged == list(range(step + 3))


def ddp_probe(tmp_path, name: str, args: list[str], devices: int) -> list[dict]:
    """Run tests/ddp_probe.py on `devices` CPU processes; return each rank's probe."""
    probe = tmp_path / name
    probe.mkdir()
    extra = ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices)]
    if devices > 1:
        extra += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "DDP_PROBE_DIR": str(probe), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tests" / "ddp_probe.py"), *args, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(probe / f"rank{i}.pt") for i in range(devices)]


@pytest.mark.slow
def test_ddp_ranks_stay_identical_and_evaluate_every_image_once(tmp_path):
    # Warm-up ends on each batch's error (EMA off, batch 8): without reducing the error
    # across ranks, the ranks leave the warm-up at different steps and drift apart.
    args = fit_args(
        tmp_path,
        "--model.depth",
        "8",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.val_size",
        "201",  # odd: one rank holds one image more
        "--data.init_args.eval_batch_size",
        "50",
        "--lr_scheduler.init_args.warmup_lr",
        "0.05",
        "--lr_scheduler.init_args.warmup_until_error",
        "85",
        "--lr_scheduler.init_args.warmup_ema",
        "0.0",
        "--trainer.val_check_interval",
        "12",
        "--run.test_after_fit",
        "false",
        steps=12,
    )
    ranks = ddp_probe(tmp_path, "ddp", args, devices=2)
    assert all(r["warmup_ended_at"][0] is not None for r in ranks)  # the warm-up did end
    assert ranks[0]["warmup_ended_at"] == ranks[1]["warmup_ended_at"]
    for k, v in ranks[0]["params"].items():
        assert torch.equal(v, ranks[1]["params"][k]), k
    run = only_run_dir(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 12
    # Validation after step 12 covered all 201 images once: it equals one process on the
    # same weights.
    single = ddp_probe(
        tmp_path,
        "single",
        ["validate", *args[1:], "--ckpt_path", str(run / "checkpoints" / "last.ckpt")],
        devices=1,
    )[0]
    for key in ("val/error", "val/error5", "val/loss"):
        assert ranks[0]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-4), key
        assert ranks[1]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-4), key


def test_warmup_ends_on_error_criterion():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    s = PaperLR(opt, milestones=[100], warmup_lr=0.01, warmup_until_error=80.0, warmup_max_steps=1000)
    assert s.get_last_lr() == [0.01]
    for _ in range(20):
        s.observe_train_error(90.0)
        opt.step()
        s.step()
    assert s.warming_up and opt.param_groups[0]["lr"] == 0.01
    while s.warming_up:  # the EMA crosses 80% after a few good batches, not one
        s.observe_train_error(60.0)
        opt.step()
        s.step()
    assert 20 < s.warmup_ended_at < 30 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    state = s.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    s2 = PaperLR(opt2, milestones=[100], warmup_lr=0.01)
    assert s2.warming_up and opt2.param_groups[0]["lr"] == 0.01
    s2.load_state_dict(state)  # the resumed schedule: warm-up over, same iteration count
    assert not s2.warming_up and s2.last_epoch == s.last_epoch
    while s2.last_epoch < 100:
        opt2.step()
        s2.step()
        if s2.last_epoch == 99:
            assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01)  # /10 at iteration 100
    capped = PaperLR(opt, warmup_lr=0.01, warmup_max_steps=5)
    for _ in range(6):
        capped.observe_train_error(95.0)
        capped.step()
    assert not capped.warming_up


def test_checkpoint_of_other_architecture_is_refused(tmp_path):
    cli_main(fit_args(tmp_path, "--model.depth", "8", steps=2))
    last = next((tmp_path / "runs").glob("*/*/checkpoints/last.ckpt"))
    with pytest.raises(CheckpointMismatchError, match="depth: checkpoint 8 vs config 14"):
        cli_main(fit_args(tmp_path, "--model.depth", "14", "--ckpt_path", str(last), steps=4))


def test_unknown_config_key(tmp_path, capsys):
    with pytest.raises(OptionError, match="unknown option --model.widht: did you mean --model.width"):
        cli_main(["fit", "--config", DEPTH, "--model.widht", "3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: resnet20\n  shortcutt: B\n")
    with pytest.raises(OptionError, match="shortcutt"):
        cli_main(["fit", "--config", DEPTH, "--config", str(bad)])


@pytest.mark.slow
def test_print_config_shows_paper_recipe():
    r = subprocess.run(
        [sys.executable, "-m", "resnet_lab.cli", "fit", "--config", DEPTH, "--print_config"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    out = r.stdout
    for line in [
        "batch_size: 128",
        "lr: 0.1",
        "momentum: 0.9",
        "weight_decay: 0.0001",
        "- 32000",
        "- 48000",
        "max_steps: 64000",
        "arch: cifar_resnet",
    ]:
        assert line in out, line
    assert cli_main(["--config", DEPTH, "--data.init_args.source", "synthetic"], run=False).model.spec.shortcut == "A"


@pytest.mark.slow
def test_response_std_logging(tmp_path):
    cli = cli_main(
        fit_args(
            tmp_path,
            "--model.depth",
            "8",
            "--model.log_response_std",
            "true",
            "--run.test_after_fit",
            "false",
            steps=14,
        )
    )
    stds = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("responses/")}
    # conv1 + two 3x3 layers per basic block, after BN: positive, O(1).
    assert len(stds) == 1 + 2 * 3 and "responses/layer2.0.bn2" in stds
    assert all(0 < v < 10 for v in stds.values())


def test_a_resumed_fit_keeps_writing_last_ckpt(tmp_path):
    """Lightning's version counter saved a resumed run's checkpoints as last-v1.ckpt, leaving
    last.ckpt at the step resumed from: a second resume, or `ablate` on last.ckpt, silently
    lost the steps after it."""
    cli_main(fit_args(tmp_path, "--model.depth", "8", "--run.checkpoint_every_n_steps", "3", steps=6))
    last = only_run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    cli_main(fit_args(tmp_path, "--model.depth", "8", "--ckpt_path", str(last), steps=9))
    assert torch.load(last, weights_only=False)["global_step"] == 9
    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
