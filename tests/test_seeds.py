"""Seeds drive the data order and augmentation; a resumed run continues them exactly."""

import shutil
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from resnet_lab.train import cli_main

from .conftest import fit_args


class Batches(Callback):
    """Records each training batch (after augmentation) by its global step."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[list[int], float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch[:2]  # (images, labels[, Mixup/CutMix soft targets])
        self.seen[trainer.global_step] = (y.tolist(), float(x.double().sum()))


def run(tmp_path, seed: int, steps: int, *extra: str) -> tuple[Batches, Path]:
    rec = Batches()
    # 2,000 synthetic images, 200 for validation, batch 64: an epoch is 28 steps.
    args = fit_args(tmp_path, "--model.depth", "8", "--seed_everything", str(seed), "--data.init_args.batch_size", "64")
    cli = cli_main(
        [*args, "--trainer.max_steps", str(steps), "--run.checkpoint_every_n_steps", "30", *extra],
        extra_callbacks=[rec],
    )
    return rec, Path(cli.run_dir)


@pytest.mark.slow
def test_seeds_change_the_order_and_a_resume_continues_it(tmp_path):
    a, _ = run(tmp_path / "a", 0, 40)
    b, _ = run(tmp_path / "b", 1, 3)
    assert a.seen[0][0] != b.seen[0][0]  # another seed, another order
    a2, _ = run(tmp_path / "a2", 0, 3)
    assert a2.seen == {k: a.seen[k] for k in range(3)}  # the same seed, the same batches
    # Resume mid-epoch (step 30 of 28-step epochs) from the uninterrupted run's checkpoint.
    _, run_c = run(tmp_path / "c", 0, 30)
    ckpt = tmp_path / "step30.ckpt"
    shutil.copy(run_c / "checkpoints" / "last.ckpt", ckpt)
    assert torch.load(ckpt, weights_only=False)["global_step"] == 30
    resumed, _ = run(tmp_path / "c", 0, 40, "--ckpt_path", str(ckpt))
    assert sorted(resumed.seen) == list(range(30, 40))
    for step in range(30, 40):
        assert resumed.seen[step] == a.seen[step], step  # same images, same crops and flips
