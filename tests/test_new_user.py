"""What a new user hits (issue 18): each test here failed on the code before its fix."""

import csv
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from resnet_lab.cli import main as cli
from resnet_lab.models import ResNetSpec, SpecError, create_model, resolve_spec
from resnet_lab.module import SPEC_OPTIONS, ResNetClassifier
from resnet_lab.train import _spec_fields, cli_main

from .conftest import DEPTH, fit_args, load, one_message, tiny_config, write_cifar_tree

# -- A. the network the user named -------------------------------------------------


@pytest.mark.parametrize(
    "extra, name",
    [
        (["--model.arch", "resnet56"], "resnet56"),  # the YAML's depth: 20 used to win
        (["--model.arch", "plain20"], "plain20"),  # used to train the residual resnet20
        (["--model.arch", "preact_resnet110"], "preact_resnet110"),
        (["--model.depth", "56", "--model.plain", "true"], "plain56"),  # the generic arch of depth.yaml
        (["--model.plain", "true", "--model.arch", "cifar_resnet", "--model.depth", "32"], "plain32"),  # any order
        (["--model.arch", "preact_resnet164_basic"], "preact_resnet164_basic"),  # names the README uses
        (["--model.arch", "preact_resnet56_bottleneck"], "preact_resnet56_bottleneck"),
        (["--model.arch", "resnet20", "--model.shortcut", "B"], "resnet20"),  # options the name leaves open
    ],
)
def test_the_arch_name_defines_the_network(extra, name):
    cli = cli_main(["--config", DEPTH, "--data.init_args.source", "synthetic", *extra], run=False)
    assert cli.model.spec.name == name
    assert cli.model.spec == resolve_spec(name, **({"shortcut": "B"} if "B" in extra else {}))


def test_the_arch_name_keeps_the_config_options_it_leaves_open(tmp_path):
    sd = tmp_path / "sd.yaml"
    sd.write_text("model:\n  stochastic_depth: batch\n  survival_last: 0.8\n")
    args = ["--config", DEPTH, "--config", str(sd), "--data.init_args.source", "synthetic"]
    assert cli_main([*args, "--model.arch", "preact_resnet56"], run=False).model.spec.name == "preact_resnet56_sd0.8"


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model.arch", "plain20", "--model.plain", "false"], ["'plain20' is plain=True", "plain=False"]),
        (["--model.arch", "preact_resnet20", "--model.preact", "false"], ["'preact_resnet20' is preact=True"]),
        (["--model.arch", "resnet20", "--model.depth", "56"], ["'resnet20' is depth=20", "'resnet56'"]),
        (["--model.base_width", "0"], ["base_width=0 must be a positive integer"]),
        (["--model.survival_last", "0.3"], ["survival_last=0.3 applies only with stochastic_depth"]),
        (["--model.stride_on", "1x1"], ["stride_on='1x1'", "basic blocks"]),
        (["--model.plain", "true", "--model.shortcut", "C"], ["plain net has no shortcuts"]),
    ],
)
def test_contradicting_or_ineffective_model_options_are_refused(tmp_path, capsys, extra, words):
    assert cli(fit_args(tmp_path, *extra)) == 2
    one_message(capsys, *words)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/*"))


def test_every_spec_name_resolves_back_to_its_spec():
    specs = [
        ResNetSpec(depth=164, preact=True),
        ResNetSpec(depth=56, preact=True, block_type="bottleneck", shortcut="B"),
        ResNetSpec(depth=110, preact=True, stochastic_depth="sample", survival_last=0.7),
        ResNetSpec(depth=20, preact=True, active_blocks=5),
        ResNetSpec(depth=50),  # cifar_resnet50, not the ImageNet net
        ResNetSpec(depth=32, plain=True),
        ResNetSpec(family="imagenet", depth=50, shortcut="B", num_classes=1000),
    ]
    for spec in specs:
        assert resolve_spec(spec.name) == spec, spec.name
    with pytest.raises(SpecError, match="unknown model 'resnet21'"):
        resolve_spec("resnet21")


def test_checkpoints_of_settings_that_did_nothing_load_as_what_they_were():
    legacy = dataclasses.asdict(ResNetSpec(depth=20, plain=True))
    legacy.update(shortcut="C", base_width=0, survival_last=0.3, stride_on="1x1")  # accepted and ignored before
    spec = ResNetSpec.from_dict(legacy)
    assert (spec.shortcut, spec.base_width, spec.survival_last, spec.stride_on) == ("A", None, 0.5, "3x3")
    assert spec == create_model("plain20").spec


def test_spec_fields_are_derived_once():
    """A new spec field of any family must reach the module's CLI options and the resume check."""
    from resnet_lab.models import ConvNeXtSpec, ViTSpec

    fields = {f.name for c in (ResNetSpec, ViTSpec, ConvNeXtSpec) for f in dataclasses.fields(c)} - {
        "family",
        "in_chans",
    }
    assert set(SPEC_OPTIONS) == fields
    assert fields <= set(inspect.signature(ResNetClassifier).parameters)
    assert set(_spec_fields({})) == fields


# -- A3, C. refused early, in one line ----------------------------------------------


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluating_random_weights_needs_a_flag(tmp_path, capsys, command):
    assert cli([command, *fit_args(tmp_path)[1:]]) == 2
    one_message(capsys, "without --ckpt_path", "--run.untrained true")


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--trainer.check_val_every_n_epoch", "0"], ["trainer.check_val_every_n_epoch=0"]),
        (["--trainer.accumulate_grad_batches", "0"], ["trainer.accumulate_grad_batches=0"]),
        (["--trainer.log_every_n_steps", "0"], ["trainer.log_every_n_steps=0"]),
        (["--trainer.limit_val_batches", "-1"], ["trainer.limit_val_batches=-1"]),
        (["--trainer.devices", "0"], ["trainer.devices"]),
        (["--optimizer.init_args.lr", "-0.1"], ["Invalid learning rate: -0.1"]),
        (["--lr_scheduler.init_args.gamma", "abc"], ["'abc'", "--lr_scheduler.init_args.gamma", "float"]),
        (["--model.depth", "abc"], ["invalid value 'abc' for --model.depth", "expected int or null"]),
        (["--run.logger", "foo"], ["invalid choice: 'foo'"]),
        (["--trainer.max_stepz", "3"], ["unknown option --trainer.max_stepz", "did you mean --trainer.max_steps"]),
    ],
)
def test_bad_trainer_and_option_values_are_one_line(tmp_path, capsys, extra, words):
    assert cli(fit_args(tmp_path, *extra)) == 2
    err = one_message(capsys, *words)
    assert "usage:" not in err


def test_a_text_file_as_checkpoint_is_named_without_torch_advice(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")
    for command in ("fit", "test"):
        assert cli([command, *fit_args(tmp_path, "--ckpt_path", str(text))[1:]]) == 2
        err = one_message(capsys, "notes.ckpt is not a readable PyTorch checkpoint (not a PyTorch file)")
        assert "weights_only" not in err


def test_a_run_root_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli(fit_args(tmp_path, "--run.root", str(tmp_path / "file" / "runs"))) == 2
    one_message(capsys, "cannot create the run directory", "--run.root")


def test_a_cifar_folder_with_one_class_is_a_layout_error(tmp_path, capsys):
    write_cifar_tree(tmp_path / "c", classes=("cat",))
    extra = ["--data.init_args.source", "folder", "--data.init_args.folder", str(tmp_path / "c")]
    assert cli(fit_args(tmp_path, *extra)) == 2
    one_message(capsys, "1 class folder(s) (cat)", "two or more")


# -- B. best-by-val sees the final weights -----------------------------------------


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _run_dir(tmp_path: Path) -> Path:
    (run,) = {p.parent for p in (tmp_path / "runs").glob("*/*/run.json")}
    return run


@pytest.mark.slow
@pytest.mark.parametrize("every", ["1", "2"])
def test_a_fit_that_stops_mid_epoch_validates_its_final_weights(tmp_path, every):
    # 1,800 training images in batches of 128: 14 steps per epoch; 6 steps end mid-epoch 0,
    # and with check_val_every_n_epoch 2 that epoch would never validate.
    cli_main(fit_args(tmp_path, "--model.depth", "8", "--trainer.check_val_every_n_epoch", every, steps=6))
    run = _run_dir(tmp_path)
    assert any(r.get("val/error") for r in _rows(run))
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    assert torch.load(best, weights_only=False)["global_step"] == 6  # the final weights were a candidate
    assert any(r.get("best_test/error") for r in _rows(run))


@pytest.mark.slow
def test_a_finished_fit_resumed_after_a_killed_test_completes_its_tests(tmp_path):
    # A kill during the post-fit test leaves the finished last.ckpt; the resumed run must test it.
    cli_main(fit_args(tmp_path, "--model.depth", "8", "--run.test_after_fit", "false", steps=6))
    run = _run_dir(tmp_path)
    assert not any(r.get("test/error") for r in _rows(run))
    cli_main(fit_args(tmp_path, "--model.depth", "8", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), steps=6))
    rows = _rows(run)
    assert [r["step"] for r in rows if r.get("test/error")] == ["6"]
    assert [r["step"] for r in rows if r.get("best_test/error")] == ["6"]


@pytest.mark.slow
def test_validate_and_test_write_no_new_run_and_no_checkpoint_warnings(tmp_path, recwarn):
    cli_main(fit_args(tmp_path, "--model.depth", "8", "--run.test_after_fit", "false", steps=2))
    run = _run_dir(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    outside = tmp_path / "elsewhere.ckpt"
    outside.write_bytes(last.read_bytes())
    before = sorted(p.name for p in run.iterdir())
    for ckpt in (last, outside, last):
        cli_main(["test", *fit_args(tmp_path, "--model.depth", "8", "--ckpt_path", str(ckpt))[1:]])
    assert len(list((tmp_path / "runs").glob("*/*"))) == 1  # nothing new for the outside checkpoint
    assert sorted(p.name for p in run.iterdir()) == sorted({*before, "config-test.yaml", "csv-test"})
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]


# -- A4, A5, C. sweeps: everything checked before any trial trains ----------------------


def _sweep(tmp_path, sweep: dict, *extra: str, capsys=None) -> int:
    from resnet_lab.sweep.cli import main as sweep_main

    return sweep_main(["--config", DEPTH, "--config", tiny_config(tmp_path, sweep), *extra])


@pytest.mark.parametrize(
    "sweep, words",
    [
        ({"ablation": {"studies": ["single", "bogus"]}}, ["unknown studies ['bogus']", "single, k"]),
        ({"ablation": {"split": "train"}}, ["split='train'"]),
        ({"ablation": {"bn_recalib": 0}}, ["bn_recalib=0 must be an integer >= 1"]),
        ({"ablation": {"paths_images": 0}}, ["paths_images=0"]),
        ({"space": {"model.depth": [8, 14], "ablation.studies": [["single"], ["k", "nope"]]}}, ["['nope']"]),
        ({"space": {"model.depth": [8, 21, 14]}}, ["cell", "'model.depth': 21", "6n+2"]),
        ({"space": {"model.depth": [8], "model.shortcut": ["A", "D"]}}, ["'model.shortcut': 'D'"]),
        ({"ablation": {"studies": ["k"], "k_max": 4}}, ["k_max 4 exceeds the 3 removable blocks of resnet8"]),
        ({"space": {"model.plain": [True]}, "ablation": {"studies": ["paths"]}}, ["paths needs a residual net"]),
        # Refusals of the built net (its weights, blocks, stages), made before it trains too:
        (
            {"ablation": {"studies": ["hessian"], "hessian_top_k": 10**6, "hessian_max_iter": 10**6}},
            ["--hessian-top-k 1000000 exceeds the 75290 weights of resnet8"],
        ),
        (
            {"ablation": {"studies": ["cka"], "cka_without": ["layer9.0"]}},
            ["--cka-without ['layer9.0']: no such block"],
        ),
        (
            {
                "space": {"model.arch": ["vit1_i32_p8_w32_h2_m64"]},
                "ablation": {"studies": ["hessian"], "hessian_per_stage": "on"},
            },
            ["vit1_i32_p8_w32_h2_m64 has no stages to separate"],
        ),
        ({"metric": "test/eror"}, ["unknown sweep.metric 'test/eror'", "test/error"]),
        ({"metric": "lesion/kmax_error"}, ["runs no ablation"]),
        ({"metric": "lesion/kmax_error", "ablation": {"studies": ["single"]}}, ["'k' ablation study"]),
        ({"space": ["model.depth"]}, ["sweep.space must be a mapping"]),
        ({"space": {"model.depth": [8, "abc"]}}, ["invalid value 'abc' for --model.depth (expected int or null)"]),
        ({"sampler": "random", "n_trials": 2, "space": {"optimizer.init_args.lr": {"low": "a", "high": 1}}}, ["low"]),
        ({"storage": "sqlite://"}, ["malformed storage URL 'sqlite://'", "in-memory"]),
        ({"storage": "sqlite:///:memory:"}, ["in-memory"]),
    ],
)
def test_sweep_configuration_errors_stop_before_any_training(tmp_path, capsys, sweep, words):
    base = {"study_name": "bad", "space": {"model.depth": [8]}, "metric": "test/error"}
    assert _sweep(tmp_path, {**base, **sweep}) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not list(tmp_path.rglob("runs/*/*/checkpoints"))  # nothing trained


def test_summary_of_an_in_memory_storage_is_a_malformed_url(tmp_path, capsys):
    assert (
        _sweep(
            tmp_path, {"study_name": "s", "space": {"model.depth": [8]}}, "--summary", "--sweep.storage", "sqlite://"
        )
        == 2
    )
    assert "malformed storage URL" in capsys.readouterr().err


def test_a_malformed_sweep_yaml_is_one_line(tmp_path, capsys):
    from resnet_lab.sweep.cli import main as sweep_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep:\n  study_name: x\n  space: {model.depth: [8, 14}\n")
    assert sweep_main(["--config", DEPTH, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml is not valid YAML at line 3" in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_a_trial_stopped_by_a_configuration_error_is_failed_not_running(tmp_path, monkeypatch):
    from optuna.trial import TrialState

    import resnet_lab.sweep.run as sweep_run

    def broken(*args, **kwargs):
        raise SystemExit(2)  # what a parser error inside the trial's ablation used to do

    monkeypatch.setattr(sweep_run, "run_lesions", broken)
    with pytest.raises(SystemExit):
        _sweep(tmp_path, {"study_name": "f", "space": {"model.depth": [8]}, "ablation": {"studies": ["single"]}})
    (t,) = load(tmp_path, "f").trials
    assert t.state == TrialState.FAIL and "SystemExit" in t.user_attrs["error"]


@pytest.mark.slow
def test_known_library_warnings_are_not_repeated_per_trial(tmp_path, recwarn, caplog):
    import re

    from resnet_lab.train import KNOWN_WARNINGS

    assert _sweep(tmp_path, {"study_name": "w", "space": {"model.depth": [8, 14]}}) == 0
    known = [*KNOWN_WARNINGS, "Heartbeat of storage"]
    assert not [str(w.message) for w in recwarn if any(re.search(m, str(w.message)) for m in known)]
    assert "litlogger" not in caplog.text


# -- D. numbers a researcher reads --------------------------------------------------------


def test_errors_are_whole_images_without_float32_noise(tmp_path):
    fit = cli_main(fit_args(tmp_path, "--model.depth", "8", "--data.init_args.eval_subset", "300", steps=3))
    for key in ("val/error", "test/error", "test/acc", "test/error5", "best_test/error"):
        value = {**fit.fit_metrics, **fit.test_metrics}[key]
        wrong = value * 300 / 100 if not key.startswith("val") else value * 200 / 100
        assert abs(wrong - round(wrong)) < 1e-9 and len(repr(value)) <= 7, (key, value)
    rows = _rows(_run_dir(tmp_path))
    assert all(len(r["test/error"]) <= 7 for r in rows if r.get("test/error"))


def test_one_run_has_no_spread():
    from resnet_lab.ablation.studies.k import table as k_table
    from resnet_lab.sweep.summary import _fmt, describe

    one = describe([21.79])
    assert one["std"] is None and _fmt(one) == "21.79 (n = 1)"
    assert _fmt(describe([20.0, 22.0])) == "21.00 ± 1.41 (20.00, 22.00)"
    rows = [{"condition": "eval-bn", "checkpoint": "n", "study": "k", "k": 1, "error": 30.0}]
    assert k_table(rows)[1] == [["1", "30.00 (n = 1)"]]
    # With fewer distinct k-subsets than --samples (3 blocks, k = 1), all of them are taken: each
    # cell says how many it stands on, not only the header's "over samples".
    rows += [{**rows[0], "error": e} for e in (20.0, 10.0)]
    assert k_table(rows)[1] == [["1", "20.00 ± 10.00 (n = 3)"]]


def test_ablate_refuses_bn_recalib_0_and_says_when_paths_images_is_cut(two_checkpoints, tmp_path, capsys):
    out = str(tmp_path / "rep")
    with pytest.raises(SystemExit):
        cli(["ablate", two_checkpoints[0], "--out", out, "--bn-recalib", "0"])
    assert "--bn-recalib: 0 must be >= 1" in capsys.readouterr().err
    argv = ["ablate", two_checkpoints[0], "--out", out, "--studies", "paths", "--paths-images", "5000"]
    assert cli([*argv, "--samples", "1", "--limit", "10", "--no-progress"]) == 0
    assert "--paths-images 5000 exceeds the 500 images of the test split" in capsys.readouterr().err


def test_torchvision_names_without_weights_are_not_suggested(tmp_path, capsys):
    assert cli(["ablate", "torchvision:resnet200", "--out", str(tmp_path / "r"), "--data-folder", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "torchvision ships no resnet200" in err and "torchvision.models.resnet200" not in err


def test_a_malformed_fit_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: [20\n")
    assert cli(fit_args(tmp_path, "--config", str(bad))) == 2
    one_message(capsys, "bad.yaml is not valid YAML at line 3, column 1")
