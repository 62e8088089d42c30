"""Seeds drive the data order and augmentation; a resumed run continues them exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
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


@pytest.mark.slow
def test_seed_everything_true_draws_a_seed_and_records_it(tmp_path, monkeypatch):
    # Lightning's help says `seed_everything: true` uses a random seed; Lightning 2.x seeds 0, or
    # PL_GLOBAL_SEED when set (in a sweep worker: the previous trial's seed). Two runs "with random
    # seeds" were one run twice.
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # as a worker leaves it after a trial of seed 7
    seeds = []
    for name in ("a", "b"):
        cli_main(fit_args(tmp_path / name, "--model.depth", "8", "--seed_everything", "true", steps=1))
        (run_dir,) = (tmp_path / name / "runs").glob("resnet8/*")
        seed = json.loads((run_dir / "run.json").read_text())["seed"]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed_everything"] == seed  # what reruns it
        seeds.append(seed)
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds) and len(set(seeds) | {0, 7}) == 4, seeds
    # A resumed fit keeps its run's seed (the data order continues), drawn or not.
    last = run_dir / "checkpoints" / "last.ckpt"
    cli_main(fit_args(tmp_path / "b", "--model.depth", "8", "--seed_everything", "true", "--ckpt_path", str(last),
                      steps=2))  # fmt: skip
    assert json.loads((run_dir / "run.json").read_text())["seed"] == seeds[1]
