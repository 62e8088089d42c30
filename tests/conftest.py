import os
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED / "cifar10-jpeg.tar.gz"
TINY_IMAGENET = SHARED / "tiny-imagenet-10.tar.gz"
REPO = Path(__file__).resolve().parents[1]
DEPTH = str(REPO / "sweeps" / "depth.yaml")


def need(path: Path) -> Path:
    """Offline datasets sit in ../shared in CI: missing there is a failure, elsewhere a skip."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decoded-data cache for the whole session (decoding CIFAR takes ~10 s)."""
    d = Path(os.environ.get("RESNET_LAB_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["RESNET_LAB_CACHE"] = str(d)
    return d


def trained_like(name: str = "resnet20", seed: int = 0, **overrides):
    """A model in eval mode with non-trivial BN statistics, as after training."""
    from resnet_lab.models import create_model

    torch.manual_seed(seed)
    m = create_model(name, **overrides)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@torch.no_grad()
def settle_bn_by_hand(model, batches) -> None:
    """The BN reference: fresh cumulative statistics (momentum None) over `batches` in train
    mode, then eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def naive_logits(model, x, cond):
    """The lesion reference: one full forward pass of the modified network."""
    with model.remove_blocks(cond.removed):
        if cond.order is None:
            return model(x)
        with model.reorder_blocks(cond.order):
            return model(x)


@pytest.fixture(scope="session")
def two_checkpoints(tmp_path_factory):
    """A tiny resnet and its plain twin, trained a few steps on the synthetic set."""
    root = tmp_path_factory.mktemp("runs")
    from resnet_lab.train import cli_main

    paths = []
    for plain in ("false", "true"):
        cli_main(
            [
                "fit",
                "--config",
                str(REPO / "sweeps" / "depth.yaml"),
                "--data.init_args.source",
                "synthetic",
                "--data.init_args.val_size",
                "200",
                "--model.depth",
                "14",
                "--model.plain",
                plain,
                "--trainer.max_steps",
                "8",
                "--trainer.enable_progress_bar",
                "false",
                "--run.root",
                str(root),
                "--run.logger",
                "none",
                "--run.test_after_fit",
                "false",
            ]
        )
    for d in ("resnet14", "plain14"):
        (p,) = (root / d).glob("*/checkpoints/last.ckpt")
        paths.append(str(p))
    return paths


def fit_args(tmp_path, *extra, steps=6, logger="csv"):
    return [
        "fit",
        "--config",
        DEPTH,
        "--data.init_args.source",
        "synthetic",
        "--data.init_args.val_size",
        "200",
        "--trainer.max_steps",
        str(steps),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--run.root",
        str(tmp_path / "runs"),
        "--run.logger",
        logger,
        *extra,
    ]


# -- sweeps -------------------------------------------------------------------
TINY = {
    "data": {
        "class_path": "resnet_lab.data.cifar.CIFAR10DataModule",
        "init_args": {"source": "synthetic", "val_size": 200, "eval_subset": 100, "batch_size": 32},
    },
    "trainer": {"max_steps": 4, "check_val_every_n_epoch": 1, "enable_model_summary": False},
    "run": {"logger": "csv", "checkpoint_every_n_steps": 4},
}


def tiny_config(tmp_path, sweep: dict, name="tiny.yaml", extra: dict | None = None) -> str:
    cfg = {**TINY, **(extra or {}), "sweep": {"root": str(tmp_path / "sweeps"), **sweep}}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def load(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/sweeps/{name}/study.db")


# -- user errors ---------------------------------------------------------------
def one_message(capsys, *words: str) -> str:
    """The error output is one `error:` line (no traceback, no usage dump) naming `words`."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "error:" in lines[0] and err.count("error:") == 1, err
    assert lines[-1] == "(run again with --debug for the traceback)" and len(lines) <= 6, err
    for w in words:
        assert w in err, (w, err)
    return err


# -- data ------------------------------------------------------------------------
def write_cifar_tree(root: Path, classes=("cat", "dog"), per_class=3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root
