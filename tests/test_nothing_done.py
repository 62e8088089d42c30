"""Issue 26 §A: no command exits 0 having trained, validated or tested nothing. Each case
either refuses in one line (exit 2, nothing written) or does what the user plainly meant and
says so."""

import pytest

from resnet_lab.cli import main as cli

from .conftest import fit_args, one_message


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("nothing")
    assert cli(fit_args(root, steps=2)) == 0
    (last,) = (root / "runs").glob("*/*/checkpoints/last.ckpt")
    return root, last


@pytest.mark.parametrize("extra", [["--trainer.limit_train_batches", "0"], ["--trainer.limit_train_batches", "0.0"]])
def test_fit_that_would_train_no_batch_is_refused(tmp_path, capsys, extra):
    assert cli(fit_args(tmp_path, *extra)) == 2
    one_message(capsys, "trainer.limit_train_batches", "trains nothing")
    assert not list((tmp_path / "runs").glob("*/*"))


def test_fit_that_trained_no_step_is_an_error(tmp_path, capsys):
    # batches are full (drop_last): 4096 > the 1,800 synthetic training images gives none, and
    # Lightning stopped "No training batches", tested the initialisation and exited 0
    assert cli(fit_args(tmp_path, "--data.init_args.batch_size", "4096")) == 2
    one_message(capsys, "fit trained no step", "batch_size")
    assert not list((tmp_path / "runs").glob("*/*"))  # no run directory is left with untrained weights


def test_a_fraction_of_less_than_one_batch_is_one_line(tmp_path, capsys):
    # Lightning finds it once the data is known (0.01 of 14 batches): it was a traceback
    assert cli(fit_args(tmp_path, "--trainer.limit_train_batches", "0.01")) == 2
    one_message(capsys, "limit_train_batches", "Try at least")
    assert not list((tmp_path / "runs").glob("*/*"))


@pytest.mark.parametrize("extra", [["--trainer.limit_val_batches", "0"], ["--data.init_args.val_size", "0"]])
def test_fit_without_validation_says_so_and_tests_the_final_weights(tmp_path, capsys, extra):
    assert cli(fit_args(tmp_path, *extra)) == 0
    out = capsys.readouterr()
    assert "no validation" in out.out + out.err and "no best-*.ckpt" in out.out + out.err
    (run,) = (tmp_path / "runs").glob("*/*")
    assert (run / "checkpoints" / "last.ckpt").is_file() and not list(run.glob("checkpoints/best-*.ckpt"))


@pytest.mark.parametrize(
    "cmd, flag",
    [("validate", "limit_val_batches"), ("test", "limit_test_batches"), ("predict", "limit_predict_batches")],
)
def test_evaluation_of_no_batch_is_refused_before_writing(run_ckpt, capsys, cmd, flag):
    root, last = run_ckpt
    args = fit_args(root, f"--trainer.{flag}", "0", "--ckpt_path", str(last))
    assert cli([cmd, *args[1:]]) == 2
    one_message(capsys, f"trainer.{flag}=0", "nothing")
    run = last.parents[1]
    assert not list(run.glob(f"config-{cmd}.yaml")) and not (run / f"csv-{cmd}").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        # a repeated study was stored twice, and a rerun with it once was refused as another configuration
        (["--studies", "single", "single"], ["--studies lists single twice"]),
        # the option of a study that does not run was ignored, exit 0
        (["--studies", "single", "--cka-without", "layer1.0"], ["--cka-without", "cka study", "--studies"]),
        (["--studies", "single", "--probe-images", "200"], ["--probe-images", "probes study"]),
        # too few images for the estimate: every probe at chance, "chosen on a held-out fifth" of 1 image
        (["--studies", "probes", "--probe-images", "1"], ["probes needs at least 100 training images", "10 classes"]),
        # the unbiased HSIC needs 4 images: it crashed in outer() after writing the manifest
        (["--studies", "cka", "--limit", "3"], ["cka needs at least 4 images", "--limit 3"]),
    ],
)
def test_ablate_that_would_do_less_than_asked_is_refused_before_writing(two_checkpoints, tmp_path, capsys, args, words):
    out = tmp_path / "report"
    assert cli(["ablate", two_checkpoints[0], "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()  # not even the manifest


@pytest.mark.slow
def test_a_resumed_fit_keeps_one_best_checkpoint(tmp_path, capsys):
    # Issue 26 §B: a run killed after saving a new best-*.ckpt but before its next last.ckpt, then
    # resumed, kept both: last.ckpt's record of the best did not know the newer file.
    every = ["--trainer.check_val_every_n_epoch", "1", "--data.init_args.batch_size", "32"]
    every += ["--run.checkpoint_every_n_steps", "20"]
    assert cli(fit_args(tmp_path, *every, steps=60)) == 0
    (ckpts,) = (tmp_path / "runs").glob("*/*/checkpoints")
    (best,) = ckpts.glob("best-*.ckpt")
    orphan = ckpts / "best-step99-err1.00.ckpt"  # what the killed attempt wrote after last.ckpt
    orphan.write_bytes(best.read_bytes())
    assert cli(fit_args(tmp_path, *every, "--ckpt_path", str(ckpts / "last.ckpt"), steps=120)) == 0
    assert not orphan.exists() and len(list(ckpts.glob("best-*.ckpt"))) == 1
    assert "best-step99-err1.00.ckpt" in capsys.readouterr().err  # and says which it removed
