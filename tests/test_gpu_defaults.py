"""The GPU defaults' logic on CPU: bf16 autocast and the dataset kept on the training
device (what every CUDA user gets by default) train, validate and test."""

import csv

import pytorch_lightning as pl
import torch
from torch import nn

from resnet_lab.data.cifar import TensorLoader
from resnet_lab.train import cli_main

from .conftest import fit_args


class DtypeProbe(pl.Callback):
    """The dtype of the first conv's output in each stage (fit, validate, test)."""

    def __init__(self) -> None:
        self.seen: dict[str, set] = {"train": set(), "validate": set(), "test": set()}
        self.loaders: set[type] = set()

    def setup(self, trainer, pl_module, stage) -> None:
        conv = next(m for m in pl_module.net.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(self._hook(trainer))

    def _hook(self, trainer):
        def hook(module, inputs, output):
            stage = (
                "train" if trainer.training else "validate" if trainer.validating or trainer.sanity_checking else "test"
            )
            self.seen[stage].add(output.dtype)

        return hook

    def on_train_start(self, trainer, pl_module) -> None:
        self.loaders.add(type(trainer.train_dataloader))


def test_bf16_mixed_with_the_data_on_device_trains_validates_and_tests(tmp_path):
    probe = DtypeProbe()
    args = fit_args(tmp_path, "--trainer.precision", "bf16-mixed", "--data.init_args.on_device", "true", steps=8)
    cli = cli_main(args, extra_callbacks=[probe])
    assert cli.trainer.precision == "bf16-mixed" and cli.datamodule.hparams.on_device is True
    assert probe.seen["train"] == {torch.bfloat16}  # autocast ran the convs in bf16
    assert probe.seen["validate"] == {torch.bfloat16} and probe.seen["test"] == {torch.bfloat16}
    assert probe.loaders == {TensorLoader}  # batches come from the tensors kept on the device
    with open(cli.run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(r.get("val/error") for r in rows) and any(r.get("test/error") for r in rows)
    weights = torch.load(cli.run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(v.dtype == torch.float32 for k, v in weights.items() if v.is_floating_point())  # fp32 master weights
