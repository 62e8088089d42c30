"""Silent wrong results: each test here failed on the code before the fix it names."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.runner import build_datamodule
from resnet_lab.cli import main as cli
from resnet_lab.data.cifar import CIFAR10DataModule
from resnet_lab.module import ResNetClassifier
from resnet_lab.train import cli_main

from .conftest import CIFAR_ARCHIVE, REPO, TINY_IMAGENET, fit_args, load, need, tiny_config, write_cifar_tree


def ablate_rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def test_blocks_limit_the_single_and_k_studies(two_checkpoints, tmp_path):
    out = tmp_path / "rep"
    argv = [two_checkpoints[0], "--out", str(out), "--studies", "single", "k", "--blocks", "layer1.0", "layer2.1"]
    assert ablate_main([*argv, "--k-max", "2", "--samples", "3", "--limit", "50", "--no-progress"]) == 0
    rows = ablate_rows(out)
    assert {r["key"] for r in rows if r["study"] == "single"} == {"intact", "drop:layer1.0", "drop:layer2.1"}
    k2 = [r for r in rows if r["study"] == "k" and r["k"] == 2]
    assert [r["removed"] for r in k2] == ["layer1.0+layer2.1"]  # the only 2-subset of the two blocks


def test_every_checkpoint_gets_its_own_rows(two_checkpoints, tmp_path):
    last = Path(two_checkpoints[0])
    best = last.with_name("best-step8-err50.00.ckpt")  # a run's best checkpoint beside last.ckpt
    shutil.copy(last, best)
    loose = []  # two same-spec files outside run directories, with one file name
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        loose.append(str(shutil.copy(last, tmp_path / d / "model.ckpt")))
    try:
        out = tmp_path / "rep"
        argv = [str(last), str(best), *loose, "--out", str(out), "--studies", "single", "--limit", "40"]
        assert ablate_main([*argv, "--no-progress"]) == 0
    finally:
        best.unlink()
    rows = ablate_rows(out)
    labels = list(dict.fromkeys(r["checkpoint"] for r in rows))
    assert len(labels) == 4, labels
    for label in labels:
        assert sum(r["checkpoint"] == label for r in rows) == 1 + 6  # intact + 6 blocks each
    meta_labels = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("- `")]
    assert len(meta_labels) == 4
    # The same file twice is refused rather than merged.
    assert ablate_main([str(last), str(last), "--out", str(tmp_path / "twice"), "--no-progress"]) == 2


@pytest.mark.parametrize(
    "flag, value",
    [("--limit", "0"), ("--limit", "-5"), ("--samples", "0"), ("--k-max", "0"), ("--batch-size", "0")],
)
def test_ablate_counts_are_validated(two_checkpoints, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        ablate_main([two_checkpoints[0], "--out", str(tmp_path / "r"), flag, value, "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "must be >=" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_report_states_the_images_it_evaluated(two_checkpoints, tmp_path):
    out = tmp_path / "rep"
    assert (
        ablate_main([two_checkpoints[0], "--out", str(out), "--studies", "single", "--limit", "77", "--no-progress"])
        == 0
    )
    assert {r["n"] for r in ablate_rows(out)} == {77}
    assert "(77 images)" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--trainer.max_steps", "0", "max_steps=0"),
        ("--data.init_args.train_subset", "-5", "train_subset=-5"),
        ("--data.init_args.eval_subset", "0", "eval_subset=0"),
        ("--data.init_args.batch_size", "0", "batch_size=0"),
        ("--data.init_args.val_size", "-1", "val_size=-1"),
    ],
)
def test_fit_counts_are_validated(tmp_path, capsys, option, value, words):
    assert cli(fit_args(tmp_path, option, value)) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the message and the --debug hint
    assert not list((tmp_path / "runs").glob("*/*"))  # no run directory left behind


def test_divergence_stops_fit_and_keeps_no_nan_checkpoint(tmp_path, capsys):
    argv = fit_args(tmp_path, "--model.depth", "8", "--optimizer.init_args.lr", "1e6", steps=40)
    assert cli([*argv, "--run.checkpoint_every_n_steps", "1"]) == 2
    assert "diverged" in capsys.readouterr().err
    for ckpt in (tmp_path / "runs").glob("*/*/checkpoints/*.ckpt"):
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


@pytest.mark.slow
def test_a_diverged_sweep_trial_is_failed_not_complete(tmp_path):
    from optuna.trial import TrialState

    from resnet_lab.sweep.cli import main as sweep_main

    cfg = tiny_config(
        tmp_path,
        {"study_name": "nan", "space": {"optimizer.init_args.lr": [1e6]}},
        extra={"trainer": {"max_steps": 30}},
    )
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 1
    (t,) = load(tmp_path, "nan").trials
    assert t.state == TrialState.FAIL and "diverged" in t.user_attrs["error"]


def test_tree_cache_sees_files_added_inside_class_folders(tmp_path):
    tree = write_cifar_tree(tmp_path / "tree")
    kw = {"folder": str(tree), "source": "folder", "val_size": 0, "cache_dir": str(tmp_path / "cache")}
    dm = CIFAR10DataModule(**kw)
    dm.setup("fit")
    assert len(dm.splits["train"][1]) == 6
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tree / "train" / "cat" / "new.png")
    dm = CIFAR10DataModule(**kw)
    dm.setup("fit")
    assert len(dm.splits["train"][1]) == 7


def test_cifar_folder_with_three_classes_gets_a_three_way_head(tmp_path):
    tree = write_cifar_tree(tmp_path / "tree", classes=("a", "b", "c"))
    cli_main(
        fit_args(
            tmp_path,
            "--data.init_args.source",
            "folder",
            "--data.init_args.folder",
            str(tree),
            "--data.init_args.val_size",
            "3",
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            "--model.depth",
            "8",
            steps=2,
        )
    )
    (ckpt,) = (tmp_path / "runs").glob("*/*/checkpoints/last.ckpt")
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["spec"]["num_classes"] == 3


@pytest.mark.slow
def test_resumed_fit_keeps_the_csv_history(tmp_path):
    def fit(steps, *extra):
        return cli_main(
            fit_args(tmp_path, "--model.depth", "8", "--run.checkpoint_every_n_steps", "4", *extra, steps=steps)
        )

    def logged_steps():
        return [int(float(r["step"])) for r in _csv(run / "csv" / "metrics.csv") if r.get("train/loss_step")]

    run = Path(fit(4).run_dir)
    assert logged_steps() == [0, 1, 2, 3]
    step4 = run / "checkpoints" / "step4.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", step4)
    fit(8, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))  # resume: the history grows
    assert logged_steps() == list(range(8))
    # Resume from an earlier checkpoint (as after a kill past it): rows before its step
    # are kept, later ones are logged again by the resumed run, none twice.
    fit(10, "--ckpt_path", str(step4))
    assert logged_steps() == list(range(10))
    # Testing a run's checkpoint writes its own file and leaves fit's history alone.
    before = (run / "csv" / "metrics.csv").read_text()
    cli_main(
        ["test", *fit_args(tmp_path, "--model.depth", "8")[1:], "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    )
    assert (run / "csv" / "metrics.csv").read_text() == before
    assert any(r.get("test/error") for r in _csv(run / "csv-test" / "metrics.csv"))


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ten_crop_test_averages_the_crop_logits(tmp_path, cache_dir):
    from torchvision import transforms as T

    from resnet_lab.data.imagenet import MEAN, STD, ImageNetDataModule

    data = str(need(TINY_IMAGENET))
    base = [
        "--config",
        str(REPO / "sweeps/imagenet.yaml"),
        "--data.init_args.path",
        data,
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.eval_batch_size",
        "10",
        "--data.init_args.scale",
        "[64, 72]",
        "--data.init_args.crop",
        "56",
        "--data.init_args.eval_resize",
        "64",
        "--model.base_width",
        "8",
        "--trainer.enable_progress_bar",
        "false",
        "--run.root",
        str(tmp_path / "runs"),
        "--run.logger",
        "none",
    ]
    fit = cli_main(
        ["fit", *base, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--run.test_after_fit", "false"]
    )
    ckpt = str(Path(fit.run_dir) / "checkpoints" / "last.ckpt")
    test = cli_main(
        ["test", *base, "--data.init_args.ten_crop", "true", "--trainer.limit_test_batches", "2", "--ckpt_path", ckpt]
    )
    got = float(test.trainer.callback_metrics["test/error"])
    # By hand: the first 20 val images (the DataModule's fixed shuffle), ten crops each.
    model = ResNetClassifier.load_from_checkpoint(ckpt).eval()
    dm = ImageNetDataModule(path=data, crop=56, eval_resize=64, num_workers=0)
    dm.setup("test")
    val = dm.val_set.dataset
    wrong = 0
    tf = T.Compose([T.Resize(64), T.TenCrop(56)])
    with torch.no_grad():
        for i in dm.val_set.indices[:20]:
            path, label = val.samples[i]
            crops = torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(c)) for c in tf(Image.open(path).convert("RGB"))])
            logits = model.net(crops).mean(0)  # (10, C) -> (C): the average over the crops
            wrong += int(logits.argmax() != label)
    assert got == pytest.approx(100 * wrong / 20, abs=1e-4)


@pytest.mark.slow
def test_ablate_imagenet_run_takes_data_folder_and_no_augmentation(tmp_path, cache_dir):
    data = str(need(TINY_IMAGENET))
    cli_main(
        [
            "fit",
            "--config",
            str(REPO / "sweeps/imagenet.yaml"),
            "--config",
            str(REPO / "sweeps/presets/shortcut-cpu.yaml"),
            "--data.init_args.path",
            data,
            "--trainer.max_steps",
            "2",
            "--run.root",
            str(tmp_path / "runs"),
            "--run.logger",
            "none",
            "--run.test_after_fit",
            "false",
            "--sweep",
            "null",
        ]
    )
    (run,) = {p.parent for p in (tmp_path / "runs").glob("*/*/run.json")}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["init_args"]["path"] == str(Path(data).resolve())  # stored absolute
    cfg["data"]["init_args"]["path"] = str(tmp_path / "moved" / "tiny.tar.gz")  # the data moved away
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    ckpt = str(run / "checkpoints" / "last.ckpt")
    argv = [ckpt, "--studies", "single", "--limit", "20", "--batch-size", "20", "--no-progress"]
    assert ablate_main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert ablate_main([*argv, "--out", str(tmp_path / "b"), "--data-folder", data, "--bn-recalib", "16"]) == 0
    dm = build_datamodule(cfg["data"], folder=data, augment=False)
    assert dm.hparams.path == str(Path(data).resolve()) and dm.hparams.augment is False
    names = [type(t).__name__ for t in dm._transforms(train=True).transforms]
    assert "RandomCrop" not in names and "RandomHorizontalFlip" not in names


@pytest.mark.slow
def test_ablate_from_another_directory_and_its_hint(two_checkpoints, tmp_path, monkeypatch, capsys, cache_dir):
    archive = need(CIFAR_ARCHIVE)
    monkeypatch.chdir(REPO)
    rel = str(Path("..") / "shared" / "data" / archive.name)
    cli_main(
        fit_args(
            tmp_path,
            "--data.init_args.source",
            "auto",
            "--data.init_args.folder",
            rel,
            "--data.init_args.download",
            "false",
            "--data.init_args.train_subset",
            "256",
            "--data.init_args.eval_subset",
            "100",
            "--model.depth",
            "8",
            "--run.test_after_fit",
            "false",
            steps=2,
        )
    )
    (ckpt,) = (tmp_path / "runs").glob("*/*/checkpoints/last.ckpt")
    monkeypatch.chdir(tmp_path)  # another working directory
    out = tmp_path / "rep"
    assert ablate_main([str(ckpt), "--out", str(out), "--studies", "single", "--limit", "20", "--no-progress"]) == 0
    # A moved dataset names ablate's own flag.
    cfg_path = ckpt.parent.parent / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["init_args"]["folder"] = "../nowhere/cifar.tar.gz"
    cfg["data"]["init_args"]["source"] = "folder"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert ablate_main([str(ckpt), "--out", str(tmp_path / "x"), "--studies", "single", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--data-folder" in err and "--data.folder" not in err


def test_ablate_leaves_gradients_enabled(two_checkpoints, tmp_path):
    assert torch.is_grad_enabled()
    assert (
        ablate_main(
            [two_checkpoints[0], "--out", str(tmp_path / "r"), "--studies", "single", "--limit", "20", "--no-progress"]
        )
        == 0
    )
    assert torch.is_grad_enabled()


def test_report_chance_line_and_kept_projections(tmp_path):
    from resnet_lab.ablation.report import chance_error, write_report

    assert chance_error(10) == pytest.approx(90.0) and chance_error(5) == pytest.approx(80.0)
    common = {"checkpoint": "n", "spec": "resnet8", "plain": False, "study": "single", "condition": "eval-bn", "n": 5}
    rows = [
        {**common, "key": "intact", "error": 10.0, "loss": 1.0, "block": "none", "position": -1,
         "downsample": False, "removed_as": "-"},
        {**common, "key": "drop:layer1.0", "error": 40.0, "loss": 2.0, "block": "layer1.0", "position": 0,
         "downsample": False, "removed_as": "relu(BN(conv1x1(x)))"},
    ]  # fmt: skip
    from resnet_lab.models import resolve_spec

    spec = {**resolve_spec("resnet8").to_dict(), "num_classes": 5}
    meta = {"command": "x", "split": "test", "n_images": 5, "n_split": 5, "options": {"studies": ["single"]},
            "checkpoints": [{"label": "n", "path": "p", "spec": spec, "train_metrics": {}}]}  # fmt: skip
    write_report(rows, tmp_path, meta)
    md = (tmp_path / "report.md").read_text()
    assert "Chance error: 80.00% (5 classes)" in md
    assert "relu(BN(conv1x1(x)))" in md and "not y = x" in md


def test_option_c_blocks_are_labelled_as_kept_projections():
    from resnet_lab.ablation import engine
    from resnet_lab.models import create_model

    conds = {
        c.key: c.meta["removed_as"] for c in engine.single_block_conditions(create_model("resnet20", shortcut="C"))
    }
    assert set(conds.values()) == {"-", "relu(BN(conv1x1(x)))"}
    conds = {c.key: c.meta["removed_as"] for c in engine.single_block_conditions(create_model("resnet20"))}
    assert conds["drop:layer1.0"] == "identity" and conds["drop:layer2.0"] == "subsample+zero-pad"


def test_cifar_and_imagenet_names_never_collide():
    from resnet_lab.models import resolve_spec

    for depth in (26, 50, 152, 200):
        cifar = resolve_spec("cifar_resnet", depth=depth)
        imagenet = resolve_spec("imagenet_resnet", depth=depth)
        assert cifar.name != imagenet.name and cifar.name == f"cifar_resnet{depth}"
    assert resolve_spec("resnet56").name == "resnet56" and resolve_spec("resnet50").name == "resnet50"
