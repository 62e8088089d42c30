"""`resnet-lab sweep`: grid completeness, checkpoint reuse, pruning, W&B agent command, bad input."""

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
import yaml
from optuna.trial import TrialState

from resnet_lab.sweep.cli import main as sweep_main
from resnet_lab.sweep.cli import wandb_agent_command
from resnet_lab.train import expand_args_json

from .conftest import REPO

TINY = {
    "data": {
        "class_path": "resnet_lab.data.cifar.CIFAR10DataModule",
        "init_args": {"source": "synthetic", "val_size": 200, "eval_subset": 100, "batch_size": 32},
    },
    "trainer": {"max_steps": 4, "check_val_every_n_epoch": 1, "enable_model_summary": False},
    "run": {"logger": "csv", "checkpoint_every_n_steps": 4},
}


def tiny_config(tmp_path, sweep: dict, name="tiny.yaml", extra: dict | None = None) -> str:
    cfg = {**TINY, **(extra or {}), "sweep": {"root": str(tmp_path / "sweeps"), **sweep}}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def load(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/sweeps/{name}/study.db")


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


def test_existing_study_with_other_space_is_refused(tmp_path, capsys):
    a = tiny_config(tmp_path, {"study_name": "s", "space": {"model.depth": [8]}}, "a.yaml")
    b = tiny_config(tmp_path, {"study_name": "s", "space": {"model.depth": [14]}}, "b.yaml")
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", a]) == 0
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", b]) == 2
    assert "different space" in capsys.readouterr().err


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
