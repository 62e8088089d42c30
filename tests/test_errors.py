"""Bad input gets one clear message and exit code 2; nothing is left behind or lost."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_lab.ablation.runner import Store
from resnet_lab.cli import main as cli
from resnet_lab.data.common import DataError
from resnet_lab.data.imagenet import ImageNetDataModule
from resnet_lab.train import cli_main

from .conftest import DEPTH, fit_args, one_message, tiny_config


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model.depth", "21"], ["CIFAR depth must be 6n+2"]),  # SpecError
        (["--model.stochastic_depth", "layer"], ["unknown stochastic_depth 'layer'", "batch, sample"]),
        (["--model.stochastic_depth", "batch", "--model.survival_last", "0"], ["survival_last must be in (0, 1]"]),
        (["--model.plain", "true", "--model.stochastic_depth", "sample"], ["plain net has no skip"]),
        (["--model.arch", "cifar_preact_resnet", "--model.active_blocks", "0"], ["in 1..9"]),
        (["--model.block_type", "bottleneck", "--model.depth", "21"], ["9n+2", "bottleneck"]),
        (["--data.init_args.source", "folder"], ["no CIFAR-10 data found"]),  # DataError, raised in setup
        (["--data.init_args.source", "bogus"], ["unknown CIFAR source 'bogus'", "synthetic"]),
        (["--ckpt_path", "/nonexistent/last.ckpt"], ["does not exist"]),
        (["--ckpt_path", "best"], ["not supported"]),
        (["--trainer.precision", "17"], ["invalid value '17' for --trainer.precision", "bf16-mixed", "null"]),
        (["--seed_everything", "-1"], ["seed_everything=-1", "from 0 to 4294967295"]),  # Lightning's traceback
        (["--trainer.gradient_clip_val", "-1"], ["gradient_clip_val=-1", "> 0"]),  # Lightning skipped clipping
        (["--seed_everything", "4294967296"], ["seed_everything=4294967296", "from 0 to 4294967295"]),
        (["--data.init_args.split_seed", "99999999999999999999"], ["split_seed=", "from 0 to 4294967295"]),
    ],
)
def test_fit_user_errors_are_one_message(tmp_path, capsys, extra, words):
    assert cli(fit_args(tmp_path, *extra)) == 2
    one_message(capsys, *words)
    assert not list((tmp_path / "runs").glob("*/*"))  # a fit that failed before its first step leaves nothing


@pytest.mark.slow
def test_checkpoint_mismatch_is_one_message_and_debug_shows_the_traceback(tmp_path, capsys):
    cli_main(fit_args(tmp_path, "--model.depth", "8", steps=2))
    (last,) = (tmp_path / "runs").glob("*/*/checkpoints/last.ckpt")
    assert cli(fit_args(tmp_path, "--model.depth", "14", "--ckpt_path", str(last), steps=4)) == 2
    one_message(capsys, "depth: checkpoint 8 vs config 14")
    from resnet_lab.module import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError):
        cli(fit_args(tmp_path, "--model.depth", "14", "--ckpt_path", str(last), "--debug", steps=4))


@pytest.mark.slow
def test_console_script_prints_no_traceback(tmp_path):
    exe = Path(sys.executable).parent / "resnet-lab"
    r = subprocess.run([str(exe), *fit_args(tmp_path, "--model.depth", "21")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "6n+2" in r.stderr


@pytest.mark.slow
def test_ckpt_path_last_resumes_the_newest_run(tmp_path, capsys):
    assert cli(fit_args(tmp_path, "--model.depth", "8", "--ckpt_path", "last", steps=2)) == 2
    one_message(capsys, "no ", "last.ckpt to resume")
    cli_main(fit_args(tmp_path, "--model.depth", "8", steps=2))
    (run,) = {p.parent for p in (tmp_path / "runs").glob("*/*/run.json")}
    fit = cli_main(fit_args(tmp_path, "--model.depth", "8", "--ckpt_path", "last", steps=4))
    assert Path(fit.run_dir) == run and fit.trainer.global_step == 4
    assert len(list((tmp_path / "runs").glob("*/*/run.json"))) == 1  # no new run directory


def test_fit_without_a_config_says_how_to_start(capsys):
    assert cli(["fit"]) == 2
    one_message(capsys, "--config sweeps/depth.yaml")


def test_option_abbreviations_are_refused(capsys):
    assert cli(["fit", "--config", DEPTH, "--model.dept", "32", "--print_config"]) == 2
    one_message(capsys, "unknown option --model.dept", "did you mean --model.depth")


def test_models_filter_without_a_match(capsys):
    assert cli(["models", "--filter", "zzz"]) == 2
    one_message(capsys, "no model name contains 'zzz'", "resnet20")


def test_ablate_out_is_a_file(two_checkpoints, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli(["ablate", two_checkpoints[0], "--out", str(f), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_corrupt_jpeg_in_an_archive_is_named_without_noise(tmp_path):
    from resnet_lab.data.cifar import load_image_folder

    archive = tmp_path / "c.tar.gz"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="JPEG")
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("d/train/cat/0.jpg", buf.getvalue()), ("d/train/cat/1.jpg", b"not a jpeg")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError) as e:
        load_image_folder(archive)
    assert "c.tar.gz:d/train/cat/1.jpg" in str(e.value) and "BytesIO" not in str(e.value) and "0x" not in str(e.value)


def test_imagenet_counts_are_validated(tmp_path):
    with pytest.raises(DataError, match="batch_size=0"):
        ImageNetDataModule(path=str(tmp_path), batch_size=0)


@pytest.mark.slow
def test_stale_temporary_checkpoints_are_removed(tmp_path):
    cli_main(fit_args(tmp_path, "--model.depth", "8", steps=2))
    (last,) = (tmp_path / "runs").glob("*/*/checkpoints/last.ckpt")
    stale = last.with_name(".last.ckpt.tmp99999")  # a save killed mid-write
    stale.write_bytes(b"partial")
    cli_main(fit_args(tmp_path, "--model.depth", "8", "--ckpt_path", str(last), steps=4))
    assert not stale.exists() and torch.load(last, weights_only=False)["global_step"] == 4


def test_a_torn_results_line_does_not_swallow_the_next_record(tmp_path):
    manifest = {"hash": "h"}
    store = Store(tmp_path / "r", manifest, overwrite=False)
    store.add("a", [{"x": 1}])
    with open(store.path, "a") as f:
        f.write('{"unit": "b", "rows": [{"x"')  # killed mid-write
    store = Store(tmp_path / "r", manifest, overwrite=False)
    assert set(store.done) == {"a"}
    store.add("c", [{"x": 3}])
    assert set(Store(tmp_path / "r", manifest, overwrite=False).done) == {"a", "c"}
    assert [json.loads(ln)["unit"] for ln in store.path.read_text().splitlines() if ln.endswith("}")] == ["a", "c"]


def test_sweep_ablation_counts_are_checked_before_training(tmp_path, capsys):
    from resnet_lab.sweep.cli import main as sweep_main

    cfg = tiny_config(tmp_path, {"study_name": "a", "ablation": {"limit": 0}, "space": {"ablation.k_max": [1]}})
    assert sweep_main(["--config", DEPTH, "--config", cfg]) == 2
    assert "limit=0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "sweeps" / "a")


def test_wandb_logger_without_wandb_installed_names_the_csv_logger(tmp_path, capsys, monkeypatch):
    # Offline GPU nodes ship no wandb: Lightning's WandbLogger raised a ModuleNotFoundError traceback.
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError; find_spec -> None
    assert cli(fit_args(tmp_path, logger="wandb")) == 2
    one_message(capsys, "wandb is not installed", "--run.logger csv")
    assert not list((tmp_path / "runs").glob("*/*"))
