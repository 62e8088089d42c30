"""Slurm requeue: a requeued `fit` continues in the run directory it started.

Under Slurm a fit's run directory is `run.root/NAME/slurm-JOB` (JOB is the array job and
task, `123_4`, or the job id), so the job finds it again when Slurm restarts it. On the
warning signal before the time limit (`#SBATCH --signal=SIGUSR1@90`), `SlurmRequeue`
saves `checkpoints/requeue.ckpt` at the end of the running batch (where Lightning's own
periodic checkpoints are taken) and requeues the job with
`scontrol requeue`. It replaces Lightning's own handler, which saves `hpc_ckpt_N.ckpt`
from inside the signal handler, mid-step: a fit resumed from it logged every later step
one number too high. When the job starts again (SLURM_RESTART_COUNT >= 1), the fit
resumes from the newest checkpoint of its run directory through the same path as
`--ckpt_path`: same run directory, same W&B run, metrics history kept up to the step.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl

REQUEUE = "requeue.ckpt"


def job_id() -> str | None:
    """`ARRAYJOB_TASK` for an array task, the job id otherwise, None outside Slurm."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def restarted() -> bool:
    """Whether Slurm restarted this job (requeue, or node failure with --requeue)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resume_point(run_dir: Path) -> Path | None:
    """The newest checkpoint to resume a run from: `checkpoints/requeue.ckpt` (saved on the
    requeue signal) or `checkpoints/last.ckpt`, whichever was written last."""
    found = [run_dir / "checkpoints" / REQUEUE, run_dir / "checkpoints" / "last.ckpt"]
    found = [p for p in found if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_dir(root: Path, name: str) -> Path | None:
    """This job's run directory for a fit named `name`, or None outside Slurm, or when a
    job that was not restarted already used it (a second fit of one job: a new directory)."""
    job = job_id()
    if job is None:
        return None
    path = root / name / f"slurm-{job}"
    return path if restarted() or not path.exists() else None


class SlurmRequeue(pl.Callback):
    """On SIGUSR1: checkpoint at the end of the running batch, then `scontrol requeue`."""

    def __init__(self, ckpt_path: Path) -> None:
        self.ckpt_path, self.requested, self.done = ckpt_path, False, False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installed its own SIGUSR1 handler before this hook; this one replaces it
        # (Lightning restores the original handlers when the fit ends).
        signal.signal(signal.SIGUSR1, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if self.done:
            return
        # Under DDP every rank must save at the same batch (save_checkpoint waits on a barrier),
        # but the signal may reach the ranks on different batches: save when any rank has it.
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.done = True
        trainer.save_checkpoint(self.ckpt_path)
        if trainer.is_global_zero:
            self._requeue(trainer.global_step)

    def _requeue(self, step: int) -> None:
        job = job_id()
        try:
            rc = subprocess.call(["scontrol", "requeue", str(job)])
        except OSError:  # no scontrol on this node's PATH: the checkpoint still resumes a resubmitted job
            print(f"Slurm job {job}: checkpoint at step {step} in {self.ckpt_path}; scontrol is not on PATH, so the "
                  "job was not requeued: resubmit it (it resumes from that checkpoint)", flush=True)  # fmt: skip
            return
        print(f"Slurm job {job}: checkpoint at step {step}, requeue " +
              ("asked" if rc == 0 else f"failed (scontrol exit {rc})"), flush=True)  # fmt: skip
