"""`resnet-lab ablate --device`: every study computes where the model is, the report says which
device computed its units, and a device this machine lacks is one line, exit 2."""

import json

import pytest
import torch

from resnet_lab.ablation import cli, engine, runner
from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.runner import full_float32, resolve_device
from resnet_lab.ablation.studies import REGISTRY

FAMILIES = ("vit1_i32_p8_w32_h2_m64", "convnext_cifar_d1-1-1-1_w8-8-16-16")  # a 1-layer ViT, a 4-block ConvNeXt
# Every study, each as small as its checks allow.
SMALL = ["--limit", "40", "--batch-size", "20", "--samples", "2", "--bn-recalib", "20", "--k-max", "2",
         "--adjacent-max", "2", "--paths-images", "8", "--probe-images", "100", "--landscape-images", "16",
         "--landscape-grid", "3", "--landscape-bn-images", "16", "--hessian-images", "8", "--hessian-max-iter", "4",
         "--hessian-slq", "1", "--shattered-lines", "1", "--shattered-points", "4", "--no-progress"]  # fmt: skip


def test_every_study_computes_on_the_models_device(two_checkpoints, tmp_path, monkeypatch):
    """With the default device set to `meta` while the studies run, a tensor a study creates
    without saying where (torch.zeros(n), torch.eye(n), a CPU generator's draw) lands on meta
    and fails the first operation that mixes it with the model's: on a GPU that tensor would
    have been on the CPU beside CUDA activations. Data loading (CPU by design, moved by
    `batches`) runs as usual; every other tensor must follow the model or say device="cpu"."""
    real_run, real_batches = cli.run_checkpoint, runner.batches

    def run_checkpoint(*a, **k):
        with torch.device("meta"):
            return real_run(*a, **k)

    def batches(*a, **k):
        with torch.device("cpu"):
            return iter(list(real_batches(*a, **k)))

    from resnet_lab.data.cifar import CIFAR10DataModule

    real_sample = CIFAR10DataModule.sample_dataloader

    def sample_dataloader(*a, **k):
        with torch.device("cpu"):
            return real_sample(*a, **k)

    monkeypatch.setattr(cli, "run_checkpoint", run_checkpoint)
    monkeypatch.setattr(runner, "batches", batches)
    monkeypatch.setattr(CIFAR10DataModule, "sample_dataloader", sample_dataloader)
    out = tmp_path / "r"
    nets = [two_checkpoints[0], "init:plain14", *(f"init:{a}" for a in FAMILIES)]  # every family's modules too
    argv = [*nets, "--out", str(out), "--studies", *REGISTRY.names, *SMALL]
    assert ablate_main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {(r["spec"], r["study"]) for r in rows} == {(n, s) for n in ("resnet14", "plain14", *FAMILIES)
                                                       for s in REGISTRY.names}  # fmt: skip


def test_the_report_says_which_device_computed_how_many_units(two_checkpoints, tmp_path):
    out = tmp_path / "r"
    argv = [two_checkpoints[0], "--out", str(out), "--studies", "single", "k", "--k-max", "2", "--samples", "2",
            "--no-progress"]  # fmt: skip
    assert ablate_main(argv) == 0
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and {rec["device"] for rec in lines} == {"cpu"}
    assert "Computed on: cpu (3 units)." in (out / "report.md").read_text()
    # A resumed report whose units came from two devices (and one line from before --device,
    # which only ran on the CPU) says so, and that the GPU's float32 had no TF32.
    lines[0]["device"] = "cuda:0 (NVIDIA H200)"
    del lines[1]["device"]
    (out / "results.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    assert ablate_main(argv) == 0
    text = (out / "report.md").read_text()
    assert "Computed on: cuda:0 (NVIDIA H200) (1 unit), cpu (2 units) in float32 without TF32." in text, text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize(
    "device, words",
    [("tpu", ["--device 'tpu'", "cpu, cuda, cuda:N or auto"]), ("cuda", ["no CUDA device", "--device cpu"]),
     ("cuda:1", ["no CUDA device"]), ("cpu:3", ["not a device"])],
)  # fmt: skip
def test_a_device_this_machine_lacks_is_one_line_and_writes_nothing(two_checkpoints, tmp_path, capsys, device, words):
    out = tmp_path / "r"
    assert ablate_main([two_checkpoints[0], "--out", str(out), "--device", device, "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("resnet-lab ablate: error:") and all(w in line for w in words), line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_auto_is_the_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")


def test_full_float32_turns_tf32_off_on_cuda_only_and_restores_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = "tf32"
    try:
        with full_float32(torch.device("cpu")):
            assert conv.fp32_precision == "tf32"
        with full_float32(torch.device("cuda", 0)):
            assert conv.fp32_precision == "ieee" and matmul.fp32_precision == "ieee"
        assert conv.fp32_precision == "tf32" and matmul.fp32_precision == before[1]
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def test_batches_samples_and_images_arrive_on_the_models_device(two_checkpoints, tmp_path, monkeypatch):
    """The data side of --device, with the model on `meta` (a second device this machine has):
    every batch a study reads, and the BN estimate of an init: net, arrive where the model is."""
    from resnet_lab.ablation.context import Context
    from resnet_lab.ablation.runner import Store, build_datamodule, load_checkpoint, manifest_for, settle_init_bn
    from resnet_lab.ablation.studies import StudyOptions

    ckpt = load_checkpoint(two_checkpoints[0])
    dm = build_datamodule(ckpt.data, augment=False, eval_batch_size=50, batch_size=50)
    dm.setup("test")
    o = StudyOptions(studies=("landscape",), limit=None)
    store = Store(tmp_path / "out", manifest_for([ckpt], o.asked()), False)
    ckpt.model.to("meta")
    ctx = Context(REGISTRY["landscape"], ckpt, dm, store, o)
    assert ctx.device.type == "meta"
    x, y = next(iter(ctx.batches()))
    xs, ys = next(iter(ctx.sample("train", 20)))
    xi, yi, _ = ctx.images(20)
    assert {t.device.type for t in (x, y, xs, ys, xi, yi)} == {"meta"} and len(yi) == 20
    seen = []
    monkeypatch.setattr(engine, "recalibrate_bn", lambda model, batches, first: seen.extend(x for x, _ in batches))
    settle_init_bn(ckpt, dm, seed=0, n=20)
    assert len(seen) == 1 and seen[0].device.type == "meta" and len(seen[0]) == 20
