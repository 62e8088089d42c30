"""Lesions of torchvision ResNets, no training: state-dict files, the torch hub cache,
an ImageNet-layout val folder (tiny-imagenet-10 stands in; weights are random here)."""

import json
import subprocess
import sys
import tarfile

import pytest
import torch
import torchvision

from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.data.imagenet import ImageNetDataModule

from .conftest import TINY_IMAGENET, need


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    for m in tv.modules():  # non-trivial BN statistics, so a mis-mapped buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(tv.state_dict(), d / "r18-10.pth")
    torch.save(torchvision.models.resnet18().state_dict(), d / "r18-1000.pth")
    return d, tv


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    with tarfile.open(need(TINY_IMAGENET)) as t:
        t.extractall(d, filter="data")
    (root,) = [p for p in d.iterdir() if p.is_dir()]
    return root / "val"  # the val folder itself: <wnid>/*.JPEG, no train/


def _ablate(*args):
    return subprocess.run([sys.executable, "-m", "resnet_lab.cli", "ablate", *map(str, args)],
                          capture_output=True, text=True)  # fmt: skip


@pytest.mark.slow
def test_state_dict_file_on_a_val_folder_matches_torchvision(weights, val_folder, tmp_path, cache_dir):
    d, tv = weights
    out = tmp_path / "rep"
    argv = [str(d / "r18-10.pth"), "--data-folder", str(val_folder), "--out", str(out), "--studies", "single",
            "--limit", "24", "--batch-size", "12", "--no-progress"]  # fmt: skip
    assert ablate_main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    intact = next(r for r in rows if r["key"] == "intact")
    assert intact["checkpoint"] == "resnet18 (torchvision: r18-10.pth)" and intact["n"] == 24
    # The same 24 images through torchvision's own model: the same number wrong.
    dm = ImageNetDataModule(path=str(val_folder), eval_batch_size=12, num_workers=0)
    dm.setup("test")
    assert dm.split_dirs["train"] is None
    wrong = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(dm.test_dataloader()):
            wrong += int((tv(x).argmax(1) != y).sum())
            if i == 1:
                break
    assert intact["wrong"] == wrong
    assert len([r for r in rows if r["study"] == "single"]) == 1 + 8  # intact + the 8 blocks of a ResNet-18


@pytest.mark.slow
def test_torchvision_name_reads_the_hub_cache_and_never_downloads(weights, tmp_path, monkeypatch, cache_dir):
    d, _ = weights
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = _ablate("torchvision:resnet18", "--data-folder", need(TINY_IMAGENET), "--out", tmp_path / "none")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no cached torchvision weights for resnet18" in r.stderr and "never downloads" in r.stderr
    (hub / "resnet18-f37072fd.pth").write_bytes((d / "r18-10.pth").read_bytes())
    out = tmp_path / "rep"
    r = _ablate("torchvision:resnet18", "--data-folder", need(TINY_IMAGENET), "--out", out, "--studies", "single",
                "--limit", "8", "--batch-size", "8", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "resnet18 (torchvision: resnet18-f37072fd.pth)" in (out / "report.md").read_text()


def test_bad_weights_give_one_clear_error(weights, tmp_path, cache_dir, capsys):
    d, _ = weights
    tiny = need(TINY_IMAGENET)
    cases = [
        (["torchvision:resnet50=" + str(d / "r18-10.pth"), "--data-folder", tiny], "holds a resnet18 state dict"),
        ([d / "r18-1000.pth", "--data-folder", tiny], "has 1000 outputs but the data has 10 classes"),
        ([d / "r18-10.pth"], "carries no data location: pass --data-folder"),
        (["torchvision:vgg16", "--data-folder", tiny], "unknown torchvision model 'vgg16'"),
        (["torchvision:resnet18=" + str(tmp_path / "missing.pth"), "--data-folder", tiny], "does not exist"),
        ([d / "r18-10.pth", "--data-folder", tmp_path], "no train/<wnid>/ and val/<wnid>/"),
    ]  # fmt: skip
    for args, msg in cases:  # in this process (a subprocess each cost 5 s); the hub-cache tests run the command
        code = ablate_main([*map(str, args), "--out", str(tmp_path / "rep"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and err.count("error:") == 1, (args, err)
        assert msg in err, (args, err)
    assert not (tmp_path / "rep").exists()  # nothing written before the inputs are known good


@pytest.mark.slow
def test_torchvision_vit_and_convnext_read_the_hub_cache(val_folder, tmp_path, monkeypatch, cache_dir):
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = _ablate("torchvision:vit_b_16", "--data-folder", need(TINY_IMAGENET), "--out", tmp_path / "none")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("error:") == 1
    assert "no cached torchvision weights for vit_b_16" in r.stderr and "never downloads" in r.stderr
    torch.manual_seed(0)
    tv = torchvision.models.convnext_tiny(num_classes=10).eval()
    torch.save(tv.state_dict(), hub / "convnext_tiny-983f1562.pth")
    torch.save({"classifier.2.weight": torch.zeros(10, 768)}, tmp_path / "half.pth")
    r = _ablate(f"torchvision:convnext_tiny={tmp_path / 'half.pth'}", "--data-folder", need(TINY_IMAGENET),
                "--out", tmp_path / "none")  # fmt: skip
    assert r.returncode == 2 and "does not fit convnext_tiny" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "rep"
    r = _ablate("torchvision:convnext_tiny", "--data-folder", val_folder, "--out", out, "--studies", "single",
                "--blocks", "stage4.1", "stage4.2", "--limit", "8", "--batch-size", "8", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "results.json").read_text())
    intact = next(r for r in rows if r["key"] == "intact")
    assert len(rows) == 3 and intact["n"] == 8
    dm = ImageNetDataModule(path=str(val_folder), eval_batch_size=8, num_workers=0)
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        assert intact["wrong"] == int((tv(x).argmax(1) != y).sum())
    assert "convnext_tiny (torchvision: convnext_tiny-983f1562.pth)" in (out / "report.md").read_text()
