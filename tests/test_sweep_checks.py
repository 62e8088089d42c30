"""`resnet-lab sweep`: what is checked before any trial trains (lists that define runs, every
value's config), and the study storage (journal paths, SQLite directories, heartbeats)."""

import os
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from resnet_lab.cli import main as cli
from resnet_lab.sweep.cli import main as sweep_main

from .conftest import REPO, tiny_config


@pytest.mark.parametrize(
    "sweep, words",
    [
        ({"seeds": [0, 0]}, "sweep.seeds lists 0 twice"),
        ({"space": {"model.depth": [8, 14, 8]}}, "sweep.space.model.depth lists 8 twice"),
        ({"space": {"model.plain": [False, True, False]}}, "lists False twice"),
    ],
)
def test_a_list_that_defines_runs_does_not_collapse(tmp_path, sweep, words):
    # Issue 26 §A: `seeds: [0, 0]` ran one trial per cell; the duplicate vanished behind Optuna's log line.
    from resnet_lab.sweep.space import SweepError, SweepSpec

    with pytest.raises(SweepError, match=words):
        SweepSpec.from_dict({"study_name": "s", "space": {"model.depth": [8]}, **sweep})


TUNED = {"n_trials": 2, "metric": "val/error"}


@pytest.mark.parametrize(
    "sweep, words",
    [
        ({"seeds": [0, -1]}, "sweep.seeds: -1 is not a seed"),
        ({"space": {"model.depth": [8], "seed_everything": [0, 4294967296]}}, "4294967296 is not a seed"),
        ({**TUNED, "sampler": "random", "space": {"seed_everything": {"low": -3, "high": 3}}}, "-3 is not a seed"),
        ({**TUNED, "sampler": "tpe", "seed": -1}, "sweep.seed: -1 is not a seed"),
        ({"ablation": {"seed": 2**40}}, "seed=1099511627776 must be an integer from 0 to 4294967295"),
    ],
)
def test_a_seed_out_of_range_is_refused_before_any_trial(sweep, words):
    # Every trial of `seeds: [0, -1]`'s -1 cells failed in Lightning's seed_everything (a traceback
    # in each trial's log); the sampler's seed -1 failed in numpy once the study started.
    from resnet_lab.sweep.space import SweepError, SweepSpec

    with pytest.raises(SweepError, match=re.escape(words)):
        SweepSpec.from_dict({"study_name": "s", "space": {"model.depth": [8]}, **sweep})


LR = "optimizer.init_args.lr"


@pytest.mark.parametrize(
    "space, words",
    [
        ({LR: {"low": 0.1, "high": 0.01}}, "low and high must be numbers with low <= high"),
        ({LR: {"low": 0, "high": 0.1, "log": True}}, "a log range needs low > 0"),  # every trial failed in Optuna
        ({LR: {"low": 0.01, "high": 0.1, "log": True, "step": 0.01}}, "log or step, not both"),  # the same
        ({LR: {"low": 0.01, "high": 0.1, "step": 0}}, "step must be a positive number"),
    ],
)
def test_a_range_optuna_cannot_sample_is_refused_before_any_trial(space, words):
    from resnet_lab.sweep.space import SweepError, SweepSpec

    with pytest.raises(SweepError, match=re.escape(words)):
        SweepSpec.from_dict({"study_name": "s", **TUNED, "sampler": "random", "space": space})


def test_journal_paths_absolute_and_relative_and_the_slurm_example(tmp_path, monkeypatch):
    # Issue 26 §B: the Slurm example's journal:///shared/... was a relative path (three slashes, then the path).
    from resnet_lab.sweep.space import SweepError, SweepSpec
    from resnet_lab.sweep.storage import storage_url

    def path(url):
        return storage_url(SweepSpec.from_dict({"study_name": "s", "space": {"model.depth": [8]}, "storage": url}))[1]

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert path("journal:////shared/u/study.log") == Path("/shared/u/study.log")
    assert path("journal:///rel/study.log") == tmp_path / "rel" / "study.log"  # against this directory
    sbatch = (REPO / "sweeps" / "slurm" / "sweep-array.sbatch").read_text()
    for url in re.findall(r"STORAGE=(journal:\S+)", sbatch):
        assert path(url.replace("$USER", "u")).is_absolute(), url
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    with pytest.raises(SweepError, match="give the absolute one, journal:////rel/study.log"):
        path("journal:///rel/study.log")
    assert path("journal:////shared/u/study.log") == Path("/shared/u/study.log")


def test_an_explicit_sqlite_file_in_a_missing_directory_is_refused(tmp_path, capsys):
    # Issue 26 §B: sqlite:////nonexistent/dir/x.db created /nonexistent/dir (as root) and ran.
    url = f"sqlite:///{tmp_path}/missing/dir/study.db"
    cfg = tiny_config(tmp_path, {"study_name": "q", "space": {"model.depth": [8]}, "storage": url})
    assert cli(["sweep", "--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert f"directory {tmp_path}/missing/dir does not exist; create it" in err and "Traceback" not in err
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "sweep, words",
    [
        ({"space": {"optimizer.init_args.lr": [0.1, -0.1, 0.2]}}, ["optimizer.init_args.lr': -0.1", "learning rate"]),
        ({"space": {"trainer.accumulate_grad_batches": [0]}}, ["trainer.accumulate_grad_batches=0"]),
        (
            {"space": {"model.depth": [8, 14]}, "overrides": [{"when": {"model.depth": 14},
                                                                "set": {"optimizer.init_args.lr": -1.0}}]},
            ["optimizer.init_args.lr': -1.0", "learning rate"],
        ),
    ],
)  # fmt: skip
def test_every_cell_s_optimizer_and_trainer_values_are_checked_before_training(tmp_path, capsys, sweep, words):
    # Issue 26 §C: such values failed inside their trial (recorded FAILED, exit 1) after others trained.
    space = {"model.depth": [8], **sweep.pop("space")}
    cfg = tiny_config(tmp_path, {"study_name": "oc", "space": space, **sweep})
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "sweeps" / "oc").exists()  # no study, no trial, no run


def test_a_finished_trial_leaves_no_heartbeat_file_in_the_journal(tmp_path):
    # Issue 26 §B: journal heartbeat files stayed after their trials completed.
    from resnet_lab.sweep.storage import JournalFileStorage

    storage = JournalFileStorage(str(tmp_path / "study.log"), 1, 3, None)
    study = optuna.create_study(storage=storage, study_name="hb")
    done, running = study.ask(), study.ask()
    for t in (done, running):
        storage.record_heartbeat(t._trial_id)
    study.tell(done, 1.0)
    beats = tmp_path / "study.log.heartbeats"
    assert not (beats / str(done._trial_id)).exists() and (beats / str(running._trial_id)).exists()


def test_a_never_beating_trial_is_judged_on_the_filesystem_s_clock(tmp_path):
    # Issue 26 §D: a trial that never beat was aged from its start on the asking worker's clock,
    # against the filesystem's: a worker whose clock is an hour behind had its new trial failed at once.
    import datetime

    from optuna.trial import FrozenTrial

    from resnet_lab.sweep.storage import JournalFileStorage

    storage = JournalFileStorage(str(tmp_path / "study.log"), 1, 3, None)
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "clock")
    behind = datetime.datetime.now() - datetime.timedelta(hours=1)
    template = FrozenTrial(number=0, state=TrialState.RUNNING, value=None, datetime_start=behind,
                           datetime_complete=None, params={}, distributions={}, user_attrs={},
                           system_attrs={}, intermediate_values={}, trial_id=0)  # fmt: skip
    trial_id = storage.create_new_trial(study_id, template_trial=template)
    assert storage._get_stale_trial_ids(study_id) == []  # first seen now, by the filesystem's clock
    beat = tmp_path / "study.log.heartbeats" / str(trial_id)
    old = beat.stat().st_mtime - 10  # no beat for 10 s of the filesystem's time: stale (grace 3 s)
    os.utime(beat, (old, old))
    assert storage._get_stale_trial_ids(study_id) == [trial_id]


def test_the_optuna_internals_the_journal_heartbeats_rely_on_are_there(tmp_path):
    # No public Optuna API lets a storage other than RDB have heartbeats: these private names are
    # what JournalFileStorage builds on (pyproject pins optuna below 6); an upgrade that moves them fails here.
    from optuna.storages import fail_stale_trials
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    from resnet_lab.sweep.storage import JournalFileStorage

    assert callable(fail_stale_trials) and issubclass(JournalFileStorage, BaseHeartbeat)
    for name in ("record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval",
                 "get_heartbeat_stale_trial_callback"):  # fmt: skip
        assert name in BaseHeartbeat.__dict__, name
    assert is_heartbeat_enabled(JournalFileStorage(str(tmp_path / "study.log"), 1, 3, None))


@pytest.mark.slow
def test_a_random_sweep_whose_every_trial_fails_stops_at_n_trials(tmp_path, capsys):
    # Failed trials did not count towards n_trials (so that a killed worker's trial, failed and
    # enqueued again, keeps its slot): when every fit failed, the worker drew trials forever
    # (1,310 failed trial folders in 10 minutes). A failure counts unless its cell was retried.
    sweep = {"study_name": "f", "sampler": "random", "n_trials": 2, "metric": "val/error",
             "space": {"model.depth": [8, 14]}}  # fmt: skip
    cfg = tiny_config(tmp_path, sweep, extra={"trainer": {"max_steps": 4, "limit_train_batches": 0.0001}})
    code = sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg, "--max-trials", "4"])
    trials = optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path}/sweeps/f/study.db").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 and code == 1
    assert "worker ran 2 trial(s), 2 failed; the study has no more work" in capsys.readouterr().out
