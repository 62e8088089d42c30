"""What a fit keeps on disk: atomic checkpoint writes, last.ckpt that never holds
diverged weights, a validation of the final step, and a CSV history that survives resume."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from .errors import DivergenceError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, then rename: a kill mid-save never corrupts the
    previous last.ckpt. Temporary files left by an earlier killed save are removed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        for stale in path.parent.glob(f".{path.name}.tmp*"):
            if stale != tmp:
                stale.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def check_finite_weights(module: torch.nn.Module, step: int) -> None:
    """Raise DivergenceError when any parameter or buffer is NaN or infinite."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DivergenceError(
                f"training diverged: {name} is not finite at step {step}; the last finite last.ckpt is kept. "
                "Lower optimizer.init_args.lr (or use the warm-up, lr_scheduler.init_args.warmup_lr)."
            )


class BestCheckpoint(ModelCheckpoint):
    """The best checkpoint by val/error. A resumed fit first removes best files that the state
    it resumes from does not know: written by the killed attempt after its last.ckpt (the
    resumed run trains those steps again), they would sit beside the real best."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.ckpt_path or not trainer.is_global_zero or not self.dirpath:
            return
        known = {Path(p).resolve() for p in self.best_k_models}
        for path in sorted(Path(self.dirpath).glob("best-*.ckpt")):
            if path.resolve() not in known:
                path.unlink()
                print(f"resumed: removed {path.name}, a best checkpoint the resumed state does not know (the steps "
                      "after the checkpoint resumed from are trained again)", file=sys.stderr, flush=True)  # fmt: skip


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt every N steps, and once more when training ends; never with
    non-finite weights (a diverged run keeps its last good checkpoint)."""

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        check_finite_weights(trainer.lightning_module, trainer.global_step)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Always, even if this step was saved already: a save inside the last training step
        # precedes that step's validation (the best-by-val state) and its logger step count.
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ValidateFinalStep(Callback):
    """Validate the weights of the last training step.

    Lightning validates at the end of an epoch (every check_val_every_n_epoch). A fit
    that stops at max_steps mid-epoch, or in an epoch without validation, would never
    validate its final weights: best-by-val could not pick them, and a fit shorter than
    one epoch would have no val/error and no best checkpoint at all. At the last step
    this asks for the validation that Lightning runs when a fit stops early."""

    def __init__(self) -> None:
        self._every: int | None = None
        self._armed = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps and not self._armed:
            self._armed, self._every = True, trainer.check_val_every_n_epoch
            trainer.check_val_every_n_epoch = None  # this epoch validates, whatever its index
            trainer.should_stop = True  # max_steps stops the fit anyway; this also validates now

    def _disarm(self, trainer: Trainer) -> None:
        if self._armed:
            trainer.check_val_every_n_epoch, self._armed = self._every, False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._disarm(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._disarm(trainer)


class HistoryCSVLogger(CSVLogger):
    """CSVLogger that keeps the metrics history of a resumed run.

    Lightning's CSV writer deletes an existing metrics.csv when it starts. This one
    keeps every row logged before `resume_step` (the checkpoint's global step) and
    drops the later ones, which the resumed run logs again. Rows are flushed as they
    are logged, so a kill loses none of them.
    """

    def __init__(self, save_dir: str, resume_step: int | None = None, name: str = "csv") -> None:
        super().__init__(save_dir, name=name, version="", flush_logs_every_n_steps=1)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self.resume_step)
        return self._experiment


def read_history(run_dir: str | os.PathLike | None, keys: tuple[str, ...], folder: str = "csv") -> dict:
    """{key: [(step, value), ...]} from a run's FOLDER/metrics.csv (the HistoryCSVLogger's
    file; `csv-validate`, `csv-test` for evaluations of a run's checkpoint); empty series
    where the run or the key is missing."""
    path = Path(run_dir or "") / folder / "metrics.csv"
    series: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    if not path.is_file():
        return series
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in keys:
                if r.get(k) not in (None, ""):
                    series[k].append((int(float(r["step"])), float(r[k])))
    return series


class _HistoryWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__: trim instead of delete
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
        if self.resume_step is not None:
            rows = [r for r in rows if r.get("step") in ("", None) or int(float(r["step"])) < self.resume_step]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = sorted(header)
