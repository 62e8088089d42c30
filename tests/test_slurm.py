"""Slurm requeue, for real: the signal, the checkpoint and the resume. Only the scheduler's
`scontrol requeue` is a stand-in (a script that records its call): no Slurm runs here."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from .conftest import fit_args


def _slurm_env(tmp_path, restart: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    scontrol.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "777",
        "SLURM_ARRAY_JOB_ID": "770",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "resnet-lab",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_RESTART_COUNT": str(restart),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.slow
def test_a_requeued_fit_resumes_in_its_run_directory(tmp_path):
    args = fit_args(tmp_path, "--run.checkpoint_every_n_steps", "1000", steps=80)  # no periodic checkpoint
    cmd = [sys.executable, "-m", "resnet_lab.cli", *args]
    run_dir = tmp_path / "runs" / "resnet20" / "slurm-770_3"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=_slurm_env(tmp_path, 0), stdout=log, stderr=subprocess.STDOUT)
    metrics = run_dir / "csv" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:  # wait until it trains
        if metrics.is_file() and metrics.read_text().count("\n") > 10:
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGUSR1)  # Slurm's warning before the time limit (#SBATCH --signal=SIGUSR1@90)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "scontrol.calls").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    first.kill()  # the scheduler stops the job it requeued
    first.wait()
    hpc = run_dir / "checkpoints" / "requeue.ckpt"
    step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step < 80, (tmp_path / "first.log").read_text()[-2000:]
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "770_3"]
    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]

    # Slurm starts the job again: the same command, SLURM_RESTART_COUNT=1.
    again = subprocess.run(cmd, env=_slurm_env(tmp_path, 1), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {hpc}" in again.stdout + again.stderr
    assert [p.name for p in (tmp_path / "runs" / "resnet20").iterdir()] == ["slurm-770_3"]  # no second run
    assert json.loads((run_dir / "run.json").read_text())["wandb_id"] == wandb_id
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 80 and not list(run_dir.glob("checkpoints/last-v*.ckpt"))
    # The metrics history is the one an uninterrupted fit writes: every logged step once.
    ref = subprocess.run([*cmd, "--run.root", str(tmp_path / "ref")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-2000:]
    (ref_metrics,) = (tmp_path / "ref").glob("resnet20/*/csv/metrics.csv")
    assert _train_steps(metrics) == _train_steps(ref_metrics)


def _train_steps(path) -> list[int]:
    with open(path) as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss_step")]


def test_outside_slurm_or_in_a_fresh_job_a_fit_starts_its_own_run(tmp_path, monkeypatch):
    from resnet_lab import slurm

    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    assert slurm.run_dir(tmp_path, "resnet20") is None
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert slurm.run_dir(tmp_path, "resnet20") == tmp_path / "resnet20" / "slurm-12"
    (tmp_path / "resnet20" / "slurm-12").mkdir(parents=True)
    assert slurm.run_dir(tmp_path, "resnet20") is None  # a second fit of the same job: a new directory
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert slurm.run_dir(tmp_path, "resnet20") == tmp_path / "resnet20" / "slurm-12"  # the requeued job: its own


@pytest.mark.parametrize("script", ["sweep-array.sbatch", "fit.sbatch"])
def test_sbatch_scripts_are_valid_and_ask_for_the_requeue_signal(script):
    from .conftest import REPO

    path = REPO / "sweeps" / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    directives = [line.split()[1] for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--signal=SIGUSR1@120" in directives and "--requeue" in directives  # what SlurmRequeue handles
    assert "srun .venv/bin/resnet-lab" in path.read_text()  # srun: the signal reaches the process
