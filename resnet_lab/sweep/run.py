"""Optuna studies of `resnet-lab fit` trials, safe for many workers.

Each worker runs the same command; they share the study through its storage (SQLite
file by default, a journal file on a shared filesystem or PostgreSQL for many machines;
see storage.py):

  - grid cells are enqueued once, under a study lock, and taken with `study.ask()`,
    which claims a waiting trial atomically: every cell runs exactly once;
  - a heartbeat marks the running trial alive; a worker killed mid-trial stops
    beating, and the next worker to ask fails it as stale and re-enqueues the same
    cell (`RetryHeartbeatStaleTrialCallback`), so no cell is lost; the retry resumes
    the killed fit from its last checkpoint, in the same run directory (and W&B
    run), so no finished step is lost either;
  - a finished trial is committed by `study.tell` and never rewritten.

A trial is one in-process `fit` (its own run directory and W&B run, grouped by the
study name and tagged with the parameters), optionally followed by a test-time
ablation of its checkpoint. Trials that differ only in `ablation.*` parameters reuse
the checkpoint of an identical finished training config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from .. import slurm
from .space import (
    SweepError,
    SweepSpec,
    changed_categoricals,
    overrides_to_args,
    split_params,
    train_key,
)
from .storage import Heartbeat, make_storage, study_lock


def quiet_optuna() -> None:
    """Optuna warnings that are known and harmless here, hidden for each worker."""
    # Heartbeats and stale-trial retries are marked experimental by Optuna, but they are the
    # documented way to survive killed workers.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Our own heartbeat thread beats for trials run outside Study.optimize (see Heartbeat).
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


class OptunaPruning(pl.Callback):
    """Report `monitor` after each validation; stop training when the pruner says so.

    Written against pytorch_lightning (optuna-integration's callback imports the
    separate `lightning` package, which resnet-lab does not use)."""

    def __init__(self, trial: optuna.Trial, monitor: str = "val/error") -> None:
        self.trial, self.monitor, self.pruned = trial, monitor, False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics[self.monitor]), step=trainer.global_step)
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


class RecordRunDir(pl.Callback):
    """Store the trial's run directory as soon as the fit has one, so that a retry of
    this trial (after the worker is killed) finds its checkpoints."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.trial.set_user_attr("run_dir", str(Path(trainer.default_root_dir).resolve()))


def resumable_checkpoint(trial: optuna.Trial, runs: Path) -> Path | None:
    """The last checkpoint of the killed attempt this trial retries, if it got that far:
    in the run directory the attempt recorded (user attributes are inherited by the
    retry), else the one run directory of the attempt's trial under `runs`. An attempt
    that reused another trial's checkpoint has no fit of its own to resume."""
    if "reused_from" in trial.user_attrs:
        return None
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir is None:
        failed = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        dirs = [p for p in (runs / f"trial{failed}").glob("*") if p.is_dir()] if failed is not None else []
        run_dir = dirs[0] if len(dirs) == 1 else None
    point = slurm.resume_point(Path(run_dir)) if run_dir else None  # last.ckpt, or a newer Slurm requeue one
    return point.resolve() if point is not None else None


def open_study(spec: SweepSpec, force: bool = False) -> tuple[optuna.Study, BaseStorage, str]:
    storage, url = make_storage(spec)
    with study_lock(url, spec.study_name):
        study = optuna.create_study(
            study_name=spec.study_name,
            storage=storage,
            direction=spec.direction,
            load_if_exists=True,
            sampler=spec.make_sampler(),
            pruner=spec.make_pruner(),
        )
        old = study.user_attrs.get("space")
        if old is not None and old != spec.space_json() and not force:
            raise SweepError(
                f"study {spec.study_name!r} exists with a different space ({old}); pick another "
                "sweep.study_name, or pass --force to add trials of the new space to it"
            )
        if old is not None and old != spec.space_json():
            fixed = changed_categoricals(json.loads(old), spec)
            if fixed:
                raise SweepError(
                    f"--force cannot change the values of {fixed} in study {spec.study_name!r}: Optuna fixes a "
                    "categorical parameter's choices for the life of a study. Use a new sweep.study_name"
                )
        if old is None or force:
            study.set_user_attr("space", spec.space_json())
            study.set_user_attr("metric", spec.metric)
        # Enqueue once per space: a grid changed under --force gets its new cells.
        if spec.sampler == "grid" and study.user_attrs.get("grid_enqueued") != spec.space_json():
            for cell in spec.grid():
                study.enqueue_trial(cell, skip_if_exists=True)
            study.set_user_attr("grid_enqueued", spec.space_json())
    return study, storage, url


def load_existing_study(spec: SweepSpec) -> optuna.Study:
    """The study, read-only (for --summary): nothing is created, enqueued or overwritten."""
    quiet_optuna()
    storage, _ = make_storage(spec, create=False)
    names = optuna.get_all_study_names(storage)
    if spec.study_name not in names:
        raise SweepError(f"no study {spec.study_name!r} in this storage; existing: {sorted(names) or 'none'}")
    return optuna.load_study(study_name=spec.study_name, storage=storage)


def next_trial(study: optuna.Study, spec: SweepSpec, url: str) -> optuna.Trial | None:
    """Claim the next trial, or None when the study is done.

    A grid is done only when no cell is waiting or running. While trials of other
    (possibly killed) workers still run, wait: a live one completes, a killed one goes
    stale after `grace_period` s and its cell is re-enqueued, and this worker runs it.
    So one restarted worker always completes the grid."""
    while True:
        with study_lock(url, spec.study_name):
            fail_stale_trials(study)  # a killed worker's trial: failed, its cell re-enqueued (any backend)
            trials = study.get_trials(deepcopy=False)
            if spec.sampler == "grid":
                if any(t.state == TrialState.WAITING for t in trials):
                    return study.ask()
                if not any(t.state == TrialState.RUNNING for t in trials):
                    return None
            elif trials_used(trials) >= spec.n_trials:
                return None
            else:
                return study.ask()
        time.sleep(min(spec.heartbeat_interval, 5))


def trials_used(trials: list[optuna.trial.FrozenTrial]) -> int:
    """What counts towards a random/TPE sweep's n_trials: every trial but a failed one whose
    cell was enqueued again (a killed or interrupted worker's: its retry takes its slot). A
    fit that fails counts, so a sweep whose every trial fails stops at n_trials."""
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return sum(not (t.state == TrialState.FAIL and t.number in retried) for t in trials)


def find_checkpoint(study: optuna.Study, key: str) -> dict[str, Any] | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("train_key") == key and Path(t.user_attrs.get("ckpt_path", "")).exists():
            return dict(t.user_attrs)
    return None


def run_fit(
    configs: list[str], overrides: dict[str, Any], spec: SweepSpec, trial: optuna.Trial, tags: list[str]
) -> dict[str, Any]:
    from ..train import cli_main

    args = [
        "fit",
        *[a for c in configs for a in ("--config", c)],
        *overrides_to_args(overrides),
        "--run.root",
        str(Path(spec.root) / spec.study_name / "runs"),
        "--run.name",
        f"trial{trial.number}",
        "--run.wandb_group",
        spec.study_name,
        "--run.tags",
        json.dumps(tags),
        "--sweep",
        "null",
        "--trainer.enable_progress_bar",
        "false",
    ]
    resume = resumable_checkpoint(trial, Path(spec.root) / spec.study_name / "runs")
    if resume is not None:
        args += ["--ckpt_path", str(resume)]
        trial.set_user_attr("resumed_from", str(resume))
        print(f"trial {trial.number} resumes a killed attempt of its cell from {resume}", flush=True)
    pruning = OptunaPruning(trial, monitor=spec.metric if spec.metric.startswith("val/") else "val/error")
    cli = cli_main(args, extra_callbacks=[pruning, RecordRunDir(trial)])
    if pruning.pruned:
        raise optuna.TrialPruned()
    metrics = {**getattr(cli, "fit_metrics", {}), **getattr(cli, "test_metrics", {})}
    metrics = {k: v for k, v in metrics.items() if k.split("/")[0] in ("train", "val", "test", "best_test")}
    ckpt = Path(cli.run_dir) / "checkpoints" / "last.ckpt"
    return {"ckpt_path": str(ckpt), "run_dir": str(cli.run_dir), "metrics": metrics, "spec": cli.model.spec.to_dict()}


def run_lesions(ckpt_path: str, opts: Any, out: Path) -> dict[str, float]:
    """A test-time ablation of one checkpoint (`opts`: StudyOptions); returns lesion/* summaries.
    On the worker's GPU when it sees one (`--device auto`), else on the CPU: the report says which."""
    from ..ablation.cli import ablate, command_for
    from ..ablation.report import lesion_summary

    command = command_for([ckpt_path], out, opts) + " --device auto"
    ablate([ckpt_path], out, opts, command=command, device="auto", progress=False)
    return lesion_summary(json.loads((out / "results.json").read_text()))


def log_lesions_to_wandb(spec: SweepSpec, trial: optuna.Trial, params: dict, summary: dict, run_dir: Path) -> None:
    import wandb

    from ..train import wandb_offline

    run = wandb.init(
        project="resnet-lab",
        group=spec.study_name,
        job_type="lesion",
        dir=str(run_dir),
        name=f"{spec.study_name}/trial{trial.number}/lesion",
        config={**params, "trial": trial.number},
        tags=[f"{k}={v}" for k, v in params.items()][:20],
        mode="offline" if wandb_offline() else "online",
        reinit="finish_previous",
    )
    for k, v in summary.items():
        run.summary[k] = v
    run.finish()


def objective(trial: optuna.Trial, spec: SweepSpec, configs: list[str], study: optuna.Study) -> float:
    params = spec.suggest(trial)
    train, test = split_params(params)
    extra = spec.cell_overrides(params)
    if extra:
        trial.set_user_attr("cell_overrides", extra)
        train = {**train, **extra}
    key = train_key(configs, train)
    trial.set_user_attr("train_key", key)
    reuse = find_checkpoint(study, key) if test else None
    if reuse:
        trial.set_user_attr("reused_from", reuse.get("trial"))
        info = {
            "ckpt_path": reuse["ckpt_path"],
            "run_dir": reuse["run_dir"],
            "metrics": {k: v for k, v in reuse.items() if k.startswith(("train/", "val/", "test/", "best_test/"))},
            "spec": reuse.get("spec"),
        }
    else:
        tags = [f"{k}={v}" for k, v in params.items()][:20]
        info = run_fit(configs, train, spec, trial, tags)
    trial.set_user_attr("trial", trial.number)
    for k in ("ckpt_path", "run_dir", "spec"):
        trial.set_user_attr(k, info[k])
    for k, v in info["metrics"].items():
        trial.set_user_attr(k, v)
    values = dict(info["metrics"])
    if spec.runs_ablation():
        opts = spec.study_options({**(spec.ablation or {}), **test}, f"trial {trial.number} ablation")
        lesions = run_lesions(info["ckpt_path"], opts, Path(info["run_dir"]) / f"lesion-trial{trial.number}")
        for k, v in lesions.items():
            trial.set_user_attr(k, v)
        values.update(lesions)
        log_lesions_to_wandb(spec, trial, params, lesions, Path(info["run_dir"]))
    if spec.metric not in values:
        raise SweepError(f"objective metric {spec.metric!r} was not produced; available: {sorted(values)}")
    return values[spec.metric]


class WorkerSlot:
    """This worker's registration among the workers of a study on this machine.

    Each worker holds an flock on its own file under `{root}/{study}/workers/`; the
    live workers are the files whose lock is held. By default each trial runs with
    (CPU cores // live workers) torch threads: two workers on 2 cores get one thread
    each instead of fighting over both (measured 7x faster for a depth-32 trial)."""

    def __init__(self, spec: SweepSpec) -> None:
        self.dir = Path(spec.root) / spec.study_name / "workers"
        self.fixed = spec.threads

    def __enter__(self) -> WorkerSlot:
        import fcntl
        import socket

        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{socket.gethostname()}-{os.getpid()}.lock"
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)

    def live_workers(self) -> int:
        import fcntl

        live = 0
        for p in self.dir.glob("*.lock"):
            try:
                fd = os.open(p, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1  # held by a running worker (this one included)
            else:  # left by a killed worker (a file seconds old may be a worker still starting up)
                if time.time() - p.stat().st_mtime > 10:
                    p.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return max(live, 1)

    def threads(self) -> int:
        return self.fixed or max(1, (os.cpu_count() or 1) // self.live_workers())


STOPPING = threading.Event()  # set by Ctrl-C or SIGTERM in this worker


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C and SIGTERM (a launcher, a scheduler) raise KeyboardInterrupt in the worker,
    which Lightning turns into a graceful stop; `run_trial` then gives the cell back.
    Without this SIGTERM would kill the worker on the spot. Old handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        STOPPING.set()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        STOPPING.clear()


def give_back(study: optuna.Study, trial: optuna.Trial) -> None:
    """FAIL an interrupted trial and enqueue its cell again, as for a killed worker's
    stale trial: the retry resumes from the trial's last checkpoint."""
    RetryHeartbeatStaleTrialCallback(max_retry=None)(study, trial.storage.get_trial(trial._trial_id))
    trial.set_user_attr("error", "interrupted (Ctrl-C or SIGTERM); its cell was enqueued again")
    study.tell(trial, state=TrialState.FAIL)
    print(f"trial {trial.number} interrupted: its cell is enqueued again and resumes on the next run", flush=True)


def run_worker(
    spec: SweepSpec, configs: list[str], force: bool = False, max_trials: int | None = None
) -> tuple[int, int]:
    """Run trials until the study is exhausted (or `max_trials`); returns (ran, failed)."""
    quiet_optuna()
    study, storage, url = open_study(spec, force)
    done = failed = 0
    with WorkerSlot(spec) as slot, stop_on_signals():
        while max_trials is None or done < max_trials:
            trial = next_trial(study, spec, url)
            if trial is None:
                break
            torch.set_num_threads(slot.threads())
            trial.set_user_attr("threads", torch.get_num_threads())
            trial.set_user_attr("worker", slot.path.stem)  # host-pid: which worker ran (or was killed in) it
            failed += run_trial(study, storage, trial, spec, configs)
            done += 1
    return done, failed


def fail_and_stop(study: optuna.Study, trial: optuna.Trial, e: BaseException) -> None:
    """A config error: FAIL the trial (never left RUNNING), then stop the worker."""
    trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
    study.tell(trial, state=TrialState.FAIL)
    raise e


def run_trial(
    study: optuna.Study, storage: BaseStorage, trial: optuna.Trial, spec: SweepSpec, configs: list[str]
) -> int:
    """Run one claimed trial and tell its outcome; returns 1 if it failed."""
    with Heartbeat(storage, trial, spec.heartbeat_interval):
        try:
            value = objective(trial, spec, configs, study)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except (KeyboardInterrupt, SystemExit) as e:
            if not (STOPPING.is_set() or isinstance(e, KeyboardInterrupt)):
                fail_and_stop(study, trial, e)  # a config error (the CLI exits)
            give_back(study, trial)  # Ctrl-C or SIGTERM (Lightning exits after a graceful stop)
            raise KeyboardInterrupt from e
        except SweepError as e:
            fail_and_stop(study, trial, e)
        except Exception as e:  # a diverged or crashed fit: FAIL, never COMPLETE
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            study.tell(trial, state=TrialState.FAIL)
            print(f"trial {trial.number} failed: {type(e).__name__}: {e}", flush=True)
            return 1
        else:
            if not math.isfinite(value):
                trial.set_user_attr("error", f"objective {spec.metric} is {value}")
                study.tell(trial, state=TrialState.FAIL)
                return 1
            study.tell(trial, value)
    return 0
