"""`resnet-lab sweep`: grid completeness, checkpoint reuse, pruning, W&B agent command, bad input."""

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from resnet_lab.sweep.cli import main as sweep_main
from resnet_lab.sweep.cli import wandb_agent_command
from resnet_lab.train import expand_args_json

from .conftest import REPO, TINY, load, tiny_config


@pytest.mark.slow
def test_grid_runs_every_cell_once_and_summarizes(tmp_path, capsys):
    cfg = tiny_config(tmp_path, {"study_name": "g", "space": {"model.depth": [8, 14], "model.plain": [False, True]}})
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    study = load(tmp_path, "g")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    cells = sorted((t.params["model.depth"], t.params["model.plain"]) for t in done)
    assert cells == [(8, False), (8, True), (14, False), (14, True)]
    assert all(0 <= t.value <= 100 for t in done)
    # Each trial is its own run, grouped by the study.
    runs = list((tmp_path / "sweeps" / "g" / "runs").glob("trial*/*/config.yaml"))
    assert len(runs) == 4
    assert yaml.safe_load(runs[0].read_text())["run"]["wandb_group"] == "g"
    out = capsys.readouterr().out
    assert "complete 4" in out and "error_vs_depth.png" in out
    assert (tmp_path / "sweeps" / "g" / "summary" / "error_vs_depth.png").exists()
    # An exhausted grid exits cleanly, running nothing.
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    assert len(load(tmp_path, "g").trials) == 4


@pytest.mark.slow
def test_test_time_params_reuse_the_checkpoint(tmp_path):
    cfg = tiny_config(
        tmp_path,
        {
            "study_name": "l",
            "metric": "lesion/kmax_error",
            "ablation": {"studies": ["single", "k"], "samples": 2, "limit": 100},
            "space": {"model.depth": [14], "ablation.k_max": [1, 2]},
        },
    )
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    t0, t1 = load(tmp_path, "l").trials
    assert t0.state == t1.state == TrialState.COMPLETE
    assert t1.user_attrs["ckpt_path"] == t0.user_attrs["ckpt_path"]  # no second fit
    assert t1.user_attrs["reused_from"] == t0.number
    assert len(list((tmp_path / "sweeps" / "l" / "runs").glob("trial*/*/run.json"))) == 1
    assert "lesion/k2_error" in t1.user_attrs and "lesion/k2_error" not in t0.user_attrs
    assert t0.value == t0.user_attrs["lesion/k1_error"]
    (report,) = (tmp_path / "sweeps" / "l" / "runs").glob("trial*/*/lesion-trial1/report.md")
    text = report.read_text()  # `--device auto`: the CPU here, and the report says so
    assert "--device auto" in text and "Computed on: cpu (" in text


@pytest.mark.slow
def test_pruning_stops_a_bad_trial(tmp_path):
    cfg = tiny_config(
        tmp_path,
        {
            "study_name": "p",
            "metric": "val/error",
            "pruner": {"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"upper": 50.0}},
            "space": {"optimizer.init_args.lr": [0.0]},  # lr 0 never learns: ~90% error
        },
        extra={"trainer": {**TINY["trainer"], "max_steps": 40, "val_check_interval": 10}},
    )
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    (t,) = load(tmp_path, "p").trials
    assert t.state == TrialState.PRUNED
    assert max(t.intermediate_values) < 40  # stopped at the first validation, not at max_steps


@pytest.mark.parametrize(
    "sweep, match",
    [
        ({"study_name": "b", "space": {"model.dept": [8]}}, r"unknown parameter 'model.dept'.*model.depth"),
        ({"study_name": "b", "space": {}}, "sweep.space is empty"),
        ({"study_name": "b", "space": {"ablation.kmax": [1]}}, "unknown test-time parameter.*k_max"),
        ({"study_name": "b", "space": {"model.depth": [8]}, "storage": "nonsense://"}, "storage"),
        (
            {"study_name": "b", "space": {"model.depth": [8]}, "storage": "postgresql://u:p@127.0.0.1:1/x"},
            "cannot open storage.*reachable",
        ),
    ],
)
def test_bad_inputs(tmp_path, capsys, sweep, match):
    cfg = tiny_config(tmp_path, sweep)
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 2
    assert __import__("re").search(match, capsys.readouterr().err)


@pytest.mark.slow
def test_existing_study_with_other_space_is_refused(tmp_path, capsys):
    a = tiny_config(tmp_path, {"study_name": "s", "space": {"model.depth": [8]}}, "a.yaml")
    b = tiny_config(tmp_path, {"study_name": "s", "space": {"model.depth": [14]}}, "b.yaml")
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", a]) == 0
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", b]) == 2
    assert "different space" in capsys.readouterr().err


@pytest.mark.slow
def test_wandb_agent_command_runs_fit(tmp_path):
    sweep_cfg = yaml.safe_load((REPO / "sweeps/wandb/depth-cpu.yaml").read_text())
    for f in (REPO / "sweeps/wandb").glob("*.yaml"):
        c = yaml.safe_load(f.read_text())
        assert {"program", "method", "metric", "parameters", "command"} <= set(c) and "${args_json_file}" in c[
            "command"
        ]
    params = {"model.depth": 8, "model.plain": True, "lr_scheduler.init_args.warmup_lr": None}
    cmd = wandb_agent_command(sweep_cfg, params, tmp_path)
    assert cmd[:3] == ["/usr/bin/env", "resnet-lab", "fit"]
    i = cmd.index("--args_json")
    assert json.loads(Path(cmd[i + 1]).read_text()) == params  # nulls and booleans survive
    assert expand_args_json(cmd[i:]) == [
        "--model.depth=8",
        "--model.plain=true",
        "--lr_scheduler.init_args.warmup_lr=null",
    ]
    (tmp_path / "s.json").write_text('{"model.shortcut": "B"}')
    assert expand_args_json(["--args_json", str(tmp_path / "s.json")]) == ["--model.shortcut=B"]
    # Run it on a tiny config: the agent's exact command, with the synthetic set swapped in.
    cmd = [str(Path(sys.executable).parent / "resnet-lab") if c == "resnet-lab" else c for c in cmd]
    cmd = [str(REPO / c) if c.startswith("sweeps/") else c for c in cmd]
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({**TINY, "run": {"logger": "csv", "root": str(tmp_path / "runs")}}))
    r = subprocess.run(
        [*cmd, "--config", str(tiny), "--trainer.enable_progress_bar=false"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (cfg,) = (tmp_path / "runs" / "plain8").glob("*/config.yaml")
    saved = yaml.safe_load(cfg.read_text())
    assert saved["model"]["plain"] is True and saved["model"]["depth"] == 8


def _pg_url():
    return os.environ.get("RESNET_LAB_TEST_PG")


@pytest.mark.slow
def test_postgres_two_workers_with_a_kill(tmp_path):
    url = _pg_url()
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL (RESNET_LAB_TEST_PG, started by .ci/run)")
        pytest.skip("no PostgreSQL (set RESNET_LAB_TEST_PG=postgresql://...)")
    name = f"pg{int(time.time())}"
    cfg = tiny_config(
        tmp_path,
        {
            "study_name": name,
            "storage": url,
            "heartbeat_interval": 1,
            "grace_period": 4,
            "space": {"model.depth": [8, 14, 20], "model.plain": [False, True]},
        },
        extra={"trainer": {**TINY["trainer"], "max_steps": 30}},
    )
    cmd = [
        sys.executable,
        "-m",
        "resnet_lab.cli",
        "sweep",
        "--config",
        str(REPO / "sweeps/depth.yaml"),
        "--config",
        cfg,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = []
    for i in range(2):
        with open(tmp_path / f"w{i}.log", "w") as log:  # the child keeps its own handle
            workers.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
    storage = optuna.storages.RDBStorage(url)
    victim = workers[0]
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and not killed:  # kill worker 0 while it runs a trial
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            time.sleep(0.5)
            continue
        running = [t for t in study.trials if t.state == TrialState.RUNNING]
        if len(running) == 2 and all(t.intermediate_values == {} for t in running):
            time.sleep(1.0)
            victim.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    assert killed, "never saw two trials running at once"
    assert workers[1].wait(timeout=600) == 0, (tmp_path / "w1.log").read_text()[-3000:]
    study = optuna.load_study(study_name=name, storage=storage)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    cells = sorted((t.params["model.depth"], t.params["model.plain"]) for t in done)
    assert cells == sorted((d, p) for d in (8, 14, 20) for p in (False, True)), cells  # each exactly once
    assert any(t.state == TrialState.FAIL for t in study.trials)  # the killed worker's trial, retried
    shutil.rmtree(tmp_path / "sweeps", ignore_errors=True)


def test_ddp_trials_are_refused_with_the_way_to_run_them(tmp_path, capsys):
    cfg = tiny_config(
        tmp_path,
        {"study_name": "ddp", "space": {"model.depth": [8]}},
        extra={"trainer": {**TINY["trainer"], "strategy": "ddp", "devices": 2, "accelerator": "cpu"}},
    )
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "strategy='ddp'" in err and "one worker per device" in err
    assert not (tmp_path / "sweeps" / "ddp" / "study.db").exists()  # no worker claimed anything


def test_worker_threads_share_the_cores(tmp_path):
    import fcntl

    from resnet_lab.sweep.run import WorkerSlot
    from resnet_lab.sweep.space import SweepSpec

    spec = SweepSpec.from_dict({"study_name": "t", "root": str(tmp_path), "space": {"model.depth": [8]}})
    cores = os.cpu_count()
    dead = tmp_path / "t" / "workers" / "host-1.lock"  # left by a killed worker: not counted
    dead.parent.mkdir(parents=True)
    dead.touch()
    os.utime(dead, (time.time() - 60, time.time() - 60))
    with WorkerSlot(spec) as me:
        assert me.live_workers() == 1 and me.threads() == cores and not dead.exists()
        other = os.open(dead.parent / "host-2.lock", os.O_CREAT | os.O_RDWR)  # a second live worker
        fcntl.flock(other, fcntl.LOCK_EX)
        assert me.live_workers() == 2 and me.threads() == max(1, cores // 2)
        os.close(other)  # it ends (or is killed): its lock goes with it
        assert me.threads() == cores
    fixed = SweepSpec.from_dict({"study_name": "t", "root": str(tmp_path), "space": {"model.depth": [8]}, "threads": 3})
    with WorkerSlot(fixed) as me:
        assert me.threads() == 3


@pytest.mark.slow
def test_rerun_completes_a_killed_last_cell(tmp_path):
    from resnet_lab.sweep.run import open_study
    from resnet_lab.sweep.space import SweepSpec

    sweep = {"study_name": "k", "heartbeat_interval": 1, "grace_period": 2, "space": {"model.depth": [8, 14]}}
    cfg = tiny_config(tmp_path, sweep)
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg, "--max-trials", "1"]) == 0
    # A worker claims the last cell, beats once, and is killed (it never tells).
    spec = SweepSpec.from_dict({**sweep, "root": str(tmp_path / "sweeps")})
    study, storage, _ = open_study(spec)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    trials = load(tmp_path, "k").trials
    done = sorted(t.params["model.depth"] for t in trials if t.state == TrialState.COMPLETE)
    assert done == [8, 14]
    assert [t.state for t in trials if t.number == trial.number] == [TrialState.FAIL]


@pytest.mark.slow
def test_force_with_a_changed_grid_runs_the_new_cells(tmp_path):
    a = tiny_config(tmp_path, {"study_name": "f", "space": {"model.depth": [8]}}, "a.yaml")
    b = tiny_config(tmp_path, {"study_name": "f", "space": {"model.depth": [8, 14]}}, "b.yaml")
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", a]) == 0
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", b, "--force"]) == 0
    done = sorted(t.params["model.depth"] for t in load(tmp_path, "f").trials if t.state == TrialState.COMPLETE)
    assert done == [8, 14]  # the new cell ran, the old one did not run twice


@pytest.mark.slow
def test_summary_is_read_only(tmp_path, capsys):
    a = tiny_config(tmp_path, {"study_name": "r", "space": {"model.depth": [8]}}, "a.yaml")
    b = tiny_config(tmp_path, {"study_name": "r", "space": {"model.depth": [14, 20]}}, "b.yaml")
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", a]) == 0
    before = load(tmp_path, "r")
    space, n = before.user_attrs["space"], len(before.trials)
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", b, "--summary"]) == 0
    after = load(tmp_path, "r")
    assert after.user_attrs["space"] == space and len(after.trials) == n
    assert all(t.state == TrialState.COMPLETE for t in after.trials)
    capsys.readouterr()
    typo = tiny_config(tmp_path, {"study_name": "rr", "space": {"model.depth": [8]}}, "c.yaml")
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", typo, "--summary"]) == 2
    err = capsys.readouterr().err
    assert "no study 'rr'" in err and "['r']" in err
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/sweeps/r/study.db") == ["r"]
    assert not (tmp_path / "sweeps" / "rr").exists()


def test_test_objective_with_a_selecting_sampler_is_refused(tmp_path, capsys):
    from resnet_lab.sweep.space import SweepError, SweepSpec

    space = {"optimizer.init_args.lr": {"low": 0.01, "high": 0.2}}
    with pytest.raises(SweepError, match="test split"):
        SweepSpec.from_dict({"study_name": "s", "sampler": "tpe", "n_trials": 4, "space": space})
    with pytest.raises(SweepError, match="test split"):
        SweepSpec.from_dict(
            {"study_name": "s", "space": {"model.depth": [8]}, "pruner": {"class_path": "optuna.pruners.MedianPruner"}}
        )
    with pytest.raises(SweepError, match="test split"):  # lesion metrics on the test split select on test too
        SweepSpec.from_dict(
            {"study_name": "s", "sampler": "random", "n_trials": 2, "metric": "lesion/kmax_error", "space": space}
        )
    # val/ metrics, grids, and an explicit opt-in are accepted.
    SweepSpec.from_dict({"study_name": "s", "sampler": "tpe", "n_trials": 4, "metric": "val/error", "space": space})
    SweepSpec.from_dict({"study_name": "s", "space": {"model.depth": [8]}})
    SweepSpec.from_dict(
        {"study_name": "s", "sampler": "tpe", "n_trials": 4, "space": space, "allow_test_objective": True}
    )
    cfg = tiny_config(tmp_path, {"study_name": "s", "sampler": "tpe", "n_trials": 2, "space": space})
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 2
    assert "val/" in capsys.readouterr().err


@pytest.mark.parametrize(
    "storage, match",
    [
        ("postgresql://:::", "malformed storage URL"),
        ("sqlite:///{tmp}/afile/sub/study.db", "directory {tmp}/afile/sub does not exist"),
        ("sqlite:///{tmp}/adir", "SQLite database"),
        ("journal:///{tmp}/missing/study.log", "directory {tmp}/missing does not exist; create it"),
        ("journal://study.log", "use journal:///path/study.log"),
        ("journal:///{tmp}/adir", "cannot open the journal file"),
        ("redis://localhost", "journal:///path/study.log"),
    ],
)
def test_storage_errors_are_one_clear_message(tmp_path, capsys, storage, match):
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "adir").mkdir()
    cfg = tiny_config(
        tmp_path, {"study_name": "e", "space": {"model.depth": [8]}, "storage": storage.format(tmp=tmp_path)}
    )
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert match.format(tmp=tmp_path) in err and "server running" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_preact_and_stochastic_depth_nets_sweep_with_the_paths_study(tmp_path):
    cfg = tiny_config(
        tmp_path,
        {
            "study_name": "p",
            "metric": "lesion/mean_single_error",
            "ablation": {"studies": ["single", "paths"], "samples": 2, "limit": 50, "paths_images": 10},
            "space": {"model.arch": ["cifar_resnet", "cifar_preact_resnet"], "model.depth": [8]},
        },
        extra={"model": {"stochastic_depth": "batch", "survival_last": 0.8}},
    )
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    done = {t.params["model.arch"]: t for t in load(tmp_path, "p").trials if t.state == TrialState.COMPLETE}
    assert set(done) == {"cifar_resnet", "cifar_preact_resnet"}
    for arch, t in done.items():
        assert t.user_attrs["spec"]["preact"] == (arch == "cifar_preact_resnet")
        assert t.user_attrs["spec"]["stochastic_depth"] == "batch" and t.user_attrs["spec"]["survival_last"] == 0.8
        lo, hi = t.user_attrs["lesion/paths_range_lo"], t.user_attrs["lesion/paths_range_hi"]
        assert 0 <= lo <= hi <= 3  # 3 blocks: lengths 0..3


@pytest.mark.slow
def test_a_killed_trial_resumes_from_its_last_checkpoint(tmp_path):
    """A worker killed mid-trial leaves checkpoints; the retried trial resumes from the
    last one, in the same run directory, with the metrics history complete."""
    sweep = {"study_name": "resume", "heartbeat_interval": 1, "grace_period": 2, "space": {"model.depth": [8]}}
    cfg = tiny_config(
        tmp_path,
        sweep,
        extra={"trainer": {**TINY["trainer"], "max_steps": 150, "log_every_n_steps": 1},
               "run": {**TINY["run"], "checkpoint_every_n_steps": 2}},
    )  # fmt: skip
    (worker,) = _workers(tmp_path, cfg, 1)  # logs to w0.log
    runs = tmp_path / "sweeps" / "resume" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and worker.poll() is None:
        ckpts = list(runs.glob("trial0/*/checkpoints/step*.ckpt")) + list(runs.glob("trial0/*/checkpoints/last.ckpt"))
        if ckpts and torch.load(ckpts[0], map_location="cpu", weights_only=False)["global_step"] >= 4:
            break
        time.sleep(0.3)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    (killed_dir,) = [p for p in runs.glob("trial0/*") if p.is_dir()]
    step = torch.load(killed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step < 150, (tmp_path / "w0.log").read_text()[-2000:]
    time.sleep(2.5)  # the killed trial's heartbeat goes stale
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    trials = load(tmp_path, "resume").trials
    (done,) = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [t.state for t in trials if t.number == 0] == [TrialState.FAIL] and done.number == 1
    assert Path(done.user_attrs["run_dir"]) == killed_dir.resolve()  # the same run, not a new one
    assert done.user_attrs["resumed_from"] == str((killed_dir / "checkpoints" / "last.ckpt").resolve())
    assert not (runs / "trial1").exists()
    with open(killed_dir / "csv" / "metrics.csv") as f:
        steps = sorted({int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/error_step")})
    assert steps[0] <= 1 and steps[-1] >= 148 and len(steps) >= 145  # history from the first step to the last


def test_a_retry_finds_the_killed_attempts_checkpoint_without_its_run_dir(tmp_path):
    """Workers of older versions recorded no run directory before the fit ended: the retry
    finds the killed attempt's one run directory by its trial number."""
    from optuna.distributions import IntDistribution

    from resnet_lab.sweep.run import resumable_checkpoint

    runs = tmp_path / "runs"
    ckpt = runs / "trial3" / "20261203-000000-abcd" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    study = optuna.create_study()
    retries = (({"failed_trial": 3}, {}), ({"failed_trial": 4}, {}), ({"failed_trial": 3}, {"reused_from": 1}))
    for attrs, user in retries:
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params={"model.depth": 8},
                distributions={"model.depth": IntDistribution(8, 8)},
                system_attrs=attrs,
                user_attrs=user,
            )
        )
    assert resumable_checkpoint(study.ask(), runs) == ckpt.resolve()
    assert resumable_checkpoint(study.ask(), runs) is None  # trial 4 left no run directory
    assert resumable_checkpoint(study.ask(), runs) is None  # it reused another trial's checkpoint: nothing to resume


def _workers(tmp_path, cfg: str, n: int, name: str = "w") -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "resnet_lab.cli", "sweep", "--config", str(REPO / "sweeps/depth.yaml"), "--config"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = []
    for i in range(n):
        with open(tmp_path / f"{name}{i}.log", "w") as log:  # the child keeps its own handle
            out.append(subprocess.Popen([*cmd, cfg], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
    return out


@pytest.mark.slow
def test_journal_file_two_workers_and_a_kill(tmp_path):
    """Two workers share one journal file; one is killed -9 mid-trial; a rerun completes
    the grid with every cell exactly once, the killed cell resumed from its checkpoint."""
    journal = tmp_path / "shared" / "study.log"
    journal.parent.mkdir()
    sweep = {"study_name": "j", "storage": f"journal:///{journal}", "heartbeat_interval": 1, "grace_period": 3,
             "space": {"model.depth": [8, 14], "model.plain": [False, True]}}  # fmt: skip
    cfg = tiny_config(tmp_path, sweep, extra={"trainer": {**TINY["trainer"], "max_steps": 60},
                                              "run": {**TINY["run"], "checkpoint_every_n_steps": 2}})  # fmt: skip
    workers = _workers(tmp_path, cfg, 2)
    deadline, victim = time.time() + 300, None
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    while time.time() < deadline and victim is None:  # kill worker 0 once its trial has a checkpoint
        if any(w.poll() is not None for w in workers):
            break
        with contextlib.suppress(KeyError):
            for t in optuna.load_study(study_name="j", storage=storage).get_trials(states=(TrialState.RUNNING,)):
                mine = t.user_attrs.get("worker", "").endswith(f"-{workers[0].pid}")
                if mine and (Path(t.user_attrs.get("run_dir", "/nowhere")) / "checkpoints" / "last.ckpt").exists():
                    victim = workers[0]
        time.sleep(0.2)
    assert victim is not None, "no trial wrote a checkpoint while both workers ran"
    victim.send_signal(signal.SIGKILL)
    assert workers[1].wait(timeout=600) == 0, (tmp_path / "w1.log").read_text()[-3000:]
    trials = optuna.load_study(study_name="j", storage=storage).trials
    done = sorted((t.params["model.depth"], t.params["model.plain"]) for t in trials if t.state == TrialState.COMPLETE)
    assert done == [(8, False), (8, True), (14, False), (14, True)]  # each cell exactly once
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1  # the killed worker's trial, failed as stale and retried
    retry = next(t for t in trials if t.state == TrialState.COMPLETE and t.params == failed[0].params)
    assert retry.user_attrs.get("resumed_from", "").endswith("last.ckpt")
    assert Path(retry.user_attrs["run_dir"]).parent.name == f"trial{failed[0].number}"  # the same run directory
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg, "--summary"]) == 0


def test_journal_heartbeats_fail_and_retry_stale_trials(tmp_path):
    from resnet_lab.sweep.storage import JournalFileStorage

    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    storage = JournalFileStorage(str(tmp_path / "s.log"), heartbeat_interval=1, grace_period=5, callback=callback)
    study = optuna.create_study(study_name="h", storage=storage)
    alive, dead = study.ask(), study.ask()
    for t in (alive, dead):
        storage.record_heartbeat(t._trial_id)
    old = time.time() - 60
    os.utime(storage.beats / str(dead._trial_id), (old, old))  # its worker stopped beating a minute ago
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.trials}
    assert states[alive.number] == TrialState.RUNNING and states[dead.number] == TrialState.FAIL
    (retry,) = [t for t in study.trials if t.state == TrialState.WAITING]
    assert retry.system_attrs["failed_trial"] == dead.number
    optuna.storages.fail_stale_trials(study)  # idempotent: nothing else is stale
    assert sum(t.state == TrialState.WAITING for t in study.trials) == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_worker_gives_its_cell_back(tmp_path, sig):
    """Ctrl-C or SIGTERM mid-trial stops the worker; a rerun runs the interrupted cell
    (resumed from its checkpoint) instead of losing it as a failed trial."""
    sweep = {"study_name": "i", "space": {"model.depth": [8, 14]}}
    cfg = tiny_config(tmp_path, sweep, extra={"trainer": {**TINY["trainer"], "max_steps": 60},
                                              "run": {**TINY["run"], "checkpoint_every_n_steps": 2}})  # fmt: skip
    (worker,) = _workers(tmp_path, cfg, 1)
    deadline = time.time() + 300
    while time.time() < deadline and worker.poll() is None:
        if list((tmp_path / "sweeps" / "i" / "runs").glob("trial0/*/checkpoints/last.ckpt")):
            break
        time.sleep(0.2)
    worker.send_signal(sig)
    assert worker.wait(timeout=120) == 130
    log = (tmp_path / "w0.log").read_text()
    assert "Traceback" not in log and "interrupted; run the same command again to resume" in log, log[-3000:]
    trials = load(tmp_path, "i").trials
    assert not any(t.state == TrialState.RUNNING for t in trials)  # nothing left running
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    trials = load(tmp_path, "i").trials
    assert sorted(t.params["model.depth"] for t in trials if t.state == TrialState.COMPLETE) == [8, 14]
    retry = next(t for t in trials if t.state == TrialState.COMPLETE and t.params["model.depth"] == 8)
    assert retry.number > 0 and retry.user_attrs["resumed_from"].endswith("last.ckpt")


def _launcher(tmp_path, cfg: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "resnet_lab.cli", "sweep", "--config", str(REPO / "sweeps/depth.yaml")]
    cmd += ["--config", cfg, "--workers", "2", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "launcher.log", "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)


def _cells(tmp_path, name) -> list[tuple]:
    trials = load(tmp_path, name).trials
    assert not any(t.state == TrialState.RUNNING for t in trials)
    return sorted((t.params["model.depth"], t.params["model.plain"]) for t in trials if t.state == TrialState.COMPLETE)


GRID = [(8, False), (8, True), (14, False), (14, True)]


@pytest.mark.slow
def test_workers_launcher_completes_a_grid_each_cell_once(tmp_path):
    sweep = {"study_name": "w", "space": {"model.depth": [8, 14], "model.plain": [False, True]}}
    launcher = _launcher(tmp_path, tiny_config(tmp_path, sweep))
    assert launcher.wait(timeout=600) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    log = (tmp_path / "launcher.log").read_text()
    assert _cells(tmp_path, "w") == GRID
    per = max(1, (os.cpu_count() or 1) // 2)
    assert "[w0] pid" in log and "[w1] pid" in log and f"{per} torch thread(s)" in log
    assert {t.user_attrs["threads"] for t in load(tmp_path, "w").trials} == {per}
    workers = {t.user_attrs["worker"] for t in load(tmp_path, "w").trials}
    assert len(workers) == 2, workers  # both workers ran cells
    assert "[w0] worker ran" in log and "[w1] worker ran" in log
    assert log.count("Trials:") == 1 and "[w0] Trials:" not in log  # the summary once, from the launcher


def _wait_for_running_checkpoints(tmp_path, name, n: int, launcher) -> list:
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None:
        if "[w1] pid" not in (tmp_path / "launcher.log").read_text():  # the study exists once workers start
            time.sleep(0.3)
            continue
        with contextlib.suppress(KeyError, optuna.exceptions.StorageInternalError):
            running = load(tmp_path, name).get_trials(states=(TrialState.RUNNING,))
            ready = [t for t in running if (Path(t.user_attrs.get("run_dir", "/x")) / "checkpoints/last.ckpt").exists()]
            if len(ready) >= n:
                return ready
        time.sleep(0.3)
    raise AssertionError((tmp_path / "launcher.log").read_text()[-3000:])


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_worker_and_a_rerun_completes(tmp_path):
    sweep = {"study_name": "t", "space": {"model.depth": [8, 14], "model.plain": [False, True]}}
    cfg = tiny_config(tmp_path, sweep, extra={"trainer": {**TINY["trainer"], "max_steps": 60},
                                              "run": {**TINY["run"], "checkpoint_every_n_steps": 2}})  # fmt: skip
    launcher = _launcher(tmp_path, cfg)
    _wait_for_running_checkpoints(tmp_path, "t", 2, launcher)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=180) == 130
    log = (tmp_path / "launcher.log").read_text()
    assert "stopped; run the same command again to resume" in log and "Traceback" not in log, log[-3000:]
    pids = [int(line.split()[2].rstrip(",")) for line in log.splitlines() if " pid " in line and line.startswith("[w")]
    for pid in pids:  # no worker outlives the launcher
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert len(_cells(tmp_path, "t")) < 4  # stopped mid-grid, nothing left RUNNING
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    trials = [(t.number, t.state.name, t.params, t.user_attrs.get("error")) for t in load(tmp_path, "t").trials]
    assert _cells(tmp_path, "t") == GRID, (trials, log[-4000:])
    resumed = [
        t for t in load(tmp_path, "t").trials if t.state == TrialState.COMPLETE and "resumed_from" in t.user_attrs
    ]
    assert len(resumed) == 2  # both interrupted cells continued from their checkpoints


@pytest.mark.slow
def test_a_worker_killed_9_under_the_launcher_has_its_cell_retried(tmp_path):
    sweep = {"study_name": "k9", "heartbeat_interval": 1, "grace_period": 3,
             "space": {"model.depth": [8, 14], "model.plain": [False, True]}}  # fmt: skip
    cfg = tiny_config(tmp_path, sweep, extra={"trainer": {**TINY["trainer"], "max_steps": 60},
                                              "run": {**TINY["run"], "checkpoint_every_n_steps": 2}})  # fmt: skip
    launcher = _launcher(tmp_path, cfg)
    victim = _wait_for_running_checkpoints(tmp_path, "k9", 1, launcher)[0]
    pid = int(victim.user_attrs["worker"].rsplit("-", 1)[1])
    os.kill(pid, signal.SIGKILL)
    assert launcher.wait(timeout=600) == 1
    log = (tmp_path / "launcher.log").read_text()
    assert f"(pid {pid}) was killed by SIGKILL" in log, log[-3000:]
    assert _cells(tmp_path, "k9") == GRID  # the other worker retried the killed cell
    retry = [t for t in load(tmp_path, "k9").trials if t.state == TrialState.COMPLETE and t.params == victim.params]
    assert retry[0].user_attrs["resumed_from"].endswith("last.ckpt")


@pytest.mark.parametrize(
    "workers, gpus, words",
    [
        ("0", [], ["--workers: 0 must be >= 1"]),
        ("two", [], ["'two' is not a number of workers"]),
        ("gpus", [], ["--workers gpus needs a visible GPU"]),
        ("3", ["0", "1"], ["--workers 3 but only 2 GPU(s) are visible (0,1)", "--workers 2"]),
        ("64", [], ["--workers 64 on 2 CPU core(s)", "--workers 2 or fewer"]),  # started 64 workers silently
        ("2 --threads=2", [], ["--workers 2 x --threads 2 = 4 threads on 2 CPU core(s)", "--threads 1"]),
    ],
)
def test_bad_worker_counts_are_one_line(tmp_path, capsys, monkeypatch, workers, gpus, words):
    monkeypatch.setattr("resnet_lab.sweep.launch.visible_gpus", lambda: gpus)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    workers, *more = workers.split()
    cfg = tiny_config(tmp_path, {"study_name": "bw", "space": {"model.depth": [8]}})
    with pytest.raises(SystemExit) as e:  # argparse exits; the launcher's own errors return 2
        code = sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg, "--workers", workers, *more])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "sweeps" / "bw" / "runs").exists()  # no worker started


def test_workers_on_gpus_each_see_one(monkeypatch):
    from resnet_lab.sweep.launch import placements

    monkeypatch.setattr("resnet_lab.sweep.launch.visible_gpus", lambda: ["2", "5", "7"])
    assert placements("gpus", None) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("2", "5", "7")]
    assert placements(2, None) == [{"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    monkeypatch.setattr("resnet_lab.sweep.launch.visible_gpus", lambda: [])
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert placements(4, None) == [{"OMP_NUM_THREADS": "4"}] * 4
    assert placements(3, 2) == [{"OMP_NUM_THREADS": "2"}] * 3  # --threads given wins


def test_a_worker_keeps_the_threads_the_user_gave_in_either_spelling():
    from resnet_lab.sweep.launch import worker_command

    env = {"OMP_NUM_THREADS": "1"}
    assert worker_command(["--config", "x.yaml"], env)[-3:-1] == ["--threads", "1"]
    for given in (["--threads", "3"], ["--threads=3"]):  # `--threads=3` was overridden by a second --threads 1
        cmd = worker_command(["--config", "x.yaml", *given], env)
        assert cmd[-len(given) - 1 : -1] == given and cmd.count("--threads") + cmd.count("--threads=3") == 1
    assert "--threads" not in worker_command(["--config", "x.yaml"], {"CUDA_VISIBLE_DEVICES": "0"})
