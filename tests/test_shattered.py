"""The `shattered` study (Balduzzi et al. 2017): the estimator against hand computations."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.studies.shattered import correlation_length, input_gradients, lag_correlation, lines

from .test_landscape import assert_refused


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_linear_model_has_correlation_1_at_every_lag_for_the_logit():
    x = torch.randn(2, 3, 4, 4)
    ((pts, label),) = lines(x, torch.tensor([3, 5]), 1, 9, 0, "pair")
    corr = lag_correlation(input_gradients(Linear(), F.cross_entropy, pts, label, "logit"))
    assert torch.allclose(corr, torch.ones(9, dtype=torch.float64), atol=1e-9)


def test_the_loss_target_is_the_loss_gradient_not_the_logits():
    model, x = Linear(), torch.randn(5, 3, 4, 4)
    g = input_gradients(model, F.cross_entropy, x, 2, "loss")
    p = torch.softmax(model(x), 1).detach()
    want = (p - F.one_hot(torch.tensor([2] * 5), 10)) @ model.fc.weight.detach()  # dL/dx = W^T (p - e_y)
    assert torch.allclose(g.flatten(1), want, atol=1e-6)
    assert not torch.allclose(g, input_gradients(model, F.cross_entropy, x, 2, "logit"), atol=1e-3)
    # Along a line the loss gradient of a linear model turns with the softmax: correlation < 1.
    ((pts, label),) = lines(torch.randn(2, 3, 4, 4) * 5, torch.tensor([2, 7]), 1, 9, 0, "pair")
    assert lag_correlation(input_gradients(model, F.cross_entropy, pts, label, "loss"))[-1] < 0.99


def test_independent_gradients_correlate_about_0_beyond_lag_0():
    corr = lag_correlation(torch.randn(64, 3072, generator=torch.Generator().manual_seed(0)))
    assert corr[0] == pytest.approx(1.0) and corr[1:33].abs().max() < 0.05


def test_the_estimator_equals_a_hand_computation():
    g = torch.tensor([[1.0, 2.0, 0.0, 1.0], [2.0, 0.0, 1.0, 3.0], [0.0, 1.0, 1.0, 2.0]])
    r = np.corrcoef(g.numpy())  # Pearson over the input dimensions
    want = [1.0, (r[0, 1] + r[1, 2]) / 2, r[0, 2]]
    assert lag_correlation(g).tolist() == pytest.approx(want, abs=1e-12)
    assert correlation_length(torch.tensor([1.0, 0.8, 0.4, 0.6])) == (2 / 3, False)
    assert correlation_length(torch.tensor([1.0, 0.8, 0.7])) == (1.0, True)


def test_lines_join_two_images_or_circle_one_at_the_same_length():
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([1, 2, 3, 4])
    pair = lines(x, y, 2, 5, 0, "pair")
    assert torch.allclose(pair[1][0][0], x[2]) and torch.allclose(pair[1][0][-1], x[3]) and pair[1][1] == 3
    (pts, label), _ = lines(x, y, 2, 5, 0, "noise")
    assert torch.allclose(pts[2], x[0], atol=1e-6) and label == 1
    assert (pts[-1] - pts[0]).norm() == pytest.approx(float((x[1] - x[0]).norm()), rel=1e-5)
    assert torch.equal(lines(x, y, 2, 5, 0, "noise")[0][0], pts)  # seeded
    assert not torch.equal(lines(x, y, 2, 5, 1, "noise")[0][0], pts)


def run(argv, out):
    assert ablate_main([*argv, "--out", str(out), "--no-progress"]) == 0
    return [r for r in json.loads((out / "results.json").read_text()) if r["study"] == "shattered"]


def test_the_study_on_a_trained_net_and_untrained_ones_and_a_killed_run_resumes_to_the_same_csv(
    two_checkpoints, tmp_path
):
    argv = [two_checkpoints[0], "init:resnet14", "init:plain14", "--studies", "shattered", "--shattered-lines", "2",
            "--shattered-points", "6"]  # fmt: skip
    rows = run(argv, tmp_path / "s")
    nets = {r["checkpoint"] for r in rows}
    assert nets == {next(r["checkpoint"] for r in rows if r["checkpoint"].startswith("resnet14 (2")),
                    "resnet14 (init, seed 0)", "plain14 (init, seed 0)"}  # fmt: skip
    for ck in nets:
        lag = [r for r in rows if r["checkpoint"] == ck and r["kind"] == "pair" and r["lag"] is not None]
        assert [r["lag"] for r in lag] == list(range(6)) and lag[0]["corr"] == pytest.approx(1.0)
        (l1,) = [r for r in rows if r["checkpoint"] == ck and r["key"] == "pair lag-1 correlation"]
        assert l1["value"] == lag[1]["corr"] and l1["images"] == 4 and l1["target"] == "loss"
    assert "Shattered gradients" in (tmp_path / "s" / "report.md").read_text()
    # A kill after the first unit, mid-write of the second: the rerun completes the same results.
    jsonl = tmp_path / "s" / "results.jsonl"
    first, second, *_ = jsonl.read_text().splitlines(keepends=True)
    expected = (tmp_path / "s" / "results.csv").read_text()
    jsonl.write_text(first + second[: len(second) // 2])
    (tmp_path / "s" / "results.csv").unlink()
    run(argv, tmp_path / "s")
    assert (tmp_path / "s" / "results.csv").read_text() == expected


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--shattered-points", "2"], "at least 3 points"),
        (["--shattered-lines", "0"], "shattered-lines"),
        (["--shattered-lines", "4", "--limit", "5"], "needs 8 images"),
        (["--shattered-target", "logits"], "shattered-target"),
    ],
)
def test_bad_shattered_options_are_one_line_and_write_nothing(two_checkpoints, tmp_path, capsys, flags, words):
    out = tmp_path / "bad"
    assert_refused([two_checkpoints[0], "--out", str(out), "--studies", "shattered", *flags], capsys, words)
    assert not out.exists()
