"""The `landscape` study (Li et al. 2018): each value against a second way of computing it."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.engine import fold_bn
from resnet_lab.ablation.runner import build_datamodule, load_checkpoint
from resnet_lab.ablation.studies.landscape import basin_width, directions, local_minima, walk_points
from resnet_lab.models import create_model

from .conftest import settle_bn_by_hand, trained_like

OPTS = ["--studies", "landscape", "--landscape-images", "64", "--landscape-grid", "3", "--landscape-radius", "0.5"]


def run(ckpts, out, *extra):
    assert ablate_main([*ckpts, "--out", str(out), *OPTS, *extra, "--no-progress"]) == 0
    return [r for r in json.loads((out / "results.json").read_text()) if r["study"] == "landscape"]


def sample(ckpt, n, seed):
    dm = build_datamodule(ckpt.data, augment=False, eval_batch_size=500, batch_size=500)
    dm.setup("test")
    xs, ys = zip(*[dm.on_after_batch_transfer(b, 0) for b in dm.sample_dataloader("train", n, seed)])
    return torch.cat(xs), torch.cat(ys)


def explicit_loss(ckpt, a, b, x, y, recalibrate=None):
    """The reference: a fresh net whose state dict is set to theta + a d1 + b d2, run forward."""
    theta = {k: p.detach().clone() for k, p in ckpt.model.named_parameters()}
    d1, d2 = directions(theta, 2, 0)
    model = create_model(ckpt.spec.name, num_classes=ckpt.spec.num_classes)
    sd = dict(ckpt.model.state_dict())
    sd.update({k: theta[k] + a * d1[k] + b * d2[k] for k in theta})
    model.load_state_dict(sd)
    if recalibrate is not None:
        settle_bn_by_hand(model, [recalibrate])
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) != y).float().mean().item()


def test_every_point_equals_a_net_set_explicitly_to_theta_plus_a_d1_plus_b_d2(two_checkpoints, tmp_path):
    rows = run(two_checkpoints[:1], tmp_path / "r")
    ckpt = load_checkpoint(two_checkpoints[0])
    x, y = sample(ckpt, 64, 0)
    points = [r for r in rows if r["walk"] != "summary"]
    assert {r["walk"] for r in points} == {"1d", "2d"} and len([r for r in points if r["walk"] == "2d"]) == 9
    for r in points:
        a, b = (r["alpha"], 0.0) if r["walk"] == "2d" or r["direction"] == 1 else (0.0, r["alpha"])
        if r["walk"] == "2d":
            b = r["beta"]
        loss, err = explicit_loss(ckpt, a, b, x, y)
        assert r["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6), r["key"]
        assert r["error"] == pytest.approx(err, abs=1e-9) and r["images"] == 64
    # The 1D walks hold +-r/2 and the centre; the centre is the unperturbed net.
    d1 = sorted(r["alpha"] for r in points if r["walk"] == "1d" and r["direction"] == 1)
    assert d1 == [-0.5, -0.25, 0.0, 0.25, 0.5]
    # The grid's strict local minima, counted by hand from its 9 points.
    grid = {(r["alpha"], r["beta"]): r["loss"] for r in points if r["walk"] == "2d"}
    by_hand = sum(all(v < grid[(a + da, b + db)] for da, db in ((0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5))
                      if (a + da, b + db) in grid) for (a, b), v in grid.items())  # fmt: skip
    (minima,) = [r["value"] for r in rows if r["walk"] == "summary" and r["key"] == "local minima"]
    assert minima == by_hand >= 1


def test_recalibrated_bn_equals_bn_re_estimated_by_hand_on_the_perturbed_net(two_checkpoints, tmp_path):
    rows = run(two_checkpoints[:1], tmp_path / "r", "--landscape-bn", "recalibrated", "--landscape-bn-images", "100",
               "--landscape-directions", "1")  # fmt: skip
    ckpt = load_checkpoint(two_checkpoints[0])
    x, y = sample(ckpt, 64, 0)
    bn_x, _ = sample(ckpt, 100, 1)  # the second, separately seeded sample
    for r in (r for r in rows if r["walk"] == "1d"):
        loss, _ = explicit_loss(ckpt, r["alpha"], 0.0, x, y, recalibrate=bn_x)
        assert r["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert not any(r["walk"] == "2d" for r in rows)  # one direction: no plane


@pytest.mark.parametrize(
    "name, left", [("resnet20", 0), ("resnet20_B", 0), ("preact_resnet20", 10), ("cifar_vit4", None)]
)
def test_folded_bns_give_the_net_s_function_and_follow_its_changes_after_a_refold(name, left):
    """The landscape evaluates each point through `fold_bn`: BNs that follow a convolution
    folded into it. It must compute the net's own function at any weights and BN statistics."""
    model = trained_like(name.removesuffix("_B"), **({"shortcut": "B"} if name.endswith("_B") else {})).eval()
    net, refold = fold_bn(model)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert (net is model) if left is None else (net is not model and len(bns) == left)  # preact: BN before a conv
    x = torch.randn(8, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
            for m in model.modules():  # new weights and statistics far from (0, 1): refold, then compare again
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 3)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) * 4 + 0.1)
                    m.bias.add_(torch.randn(m.num_features, generator=g))
            for p in model.parameters():
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        if step == 0 and net is not model:  # stale until refolded
            assert not torch.allclose(net(x), model(x), rtol=1e-3)
        refold()


class ConvUsedTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.bn(y) + y)  # bn2 follows an addition: nothing to fold into


def test_a_convolution_whose_output_is_also_used_elsewhere_is_not_folded():
    model = ConvUsedTwice().eval()
    model.bn.running_mean.fill_(2.0)
    net, _ = fold_bn(model)
    x = torch.randn(2, 3, 8, 8)
    assert net is model and torch.equal(net(x), model(x))


def test_a_bn_in_training_mode_is_not_folded():
    model = trained_like("resnet8").train()  # batch statistics: no fixed affine map to fold
    net, _ = fold_bn(model)
    assert net is model


def test_each_direction_filter_has_the_norm_of_the_weight_filter_and_bias_bn_are_zero_unless_asked():
    model = trained_like("resnet20")
    theta = {k: p.detach() for k, p in model.named_parameters()}
    for ignore in ("biasbn", "none"):
        (d,) = directions(theta, 1, 3, ignore)
        for name, w in theta.items():
            if w.dim() > 1:
                got, want = d[name].reshape(len(w), -1).norm(dim=1), w.reshape(len(w), -1).norm(dim=1)
                assert torch.allclose(got, want, rtol=1e-5), name
                assert not torch.allclose(d[name], w)  # a random direction, not the weights
            elif ignore == "biasbn":
                assert not d[name].any(), name
            else:
                assert torch.equal(d[name], w), name


def test_the_same_seed_gives_the_same_directions_across_processes_and_across_nets_of_one_shape():
    code = (
        "import torch, hashlib\n"
        "from resnet_lab.models import create_model\n"
        "from resnet_lab.ablation.studies.landscape import directions\n"
        "torch.manual_seed(5)\n"
        "m = create_model('resnet20')\n"
        "d = directions({k: p.detach() for k, p in m.named_parameters()}, 2, 7)\n"
        "print(hashlib.sha1(b''.join(t.numpy().tobytes() for x in d for t in x.values())).hexdigest())\n"
    )
    a, b = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2))  # fmt: skip
    assert a == b and len(a.strip()) == 40
    res, plain = create_model("resnet56"), create_model("plain56")
    tr, tp = ({k: p.detach() for k, p in m.named_parameters()} for m in (res, plain))
    assert [t.shape for t in tr.values()] == [t.shape for t in tp.values()]
    (dr,), (dp,) = directions(tr, 1, 7), directions(tp, 1, 7)
    for (k, w1), w2 in zip(tr.items(), tp.values()):
        if w1.dim() > 1:  # the raw draw is shared: the direction over each net's filter norms agrees
            n1, n2 = w1.reshape(len(w1), -1).norm(dim=1), w2.reshape(len(w2), -1).norm(dim=1)
            r1 = dr[k].reshape(len(w1), -1) / n1[:, None]
            r2 = dp[k].reshape(len(w2), -1) / n2[:, None]
            assert torch.allclose(r1, r2, atol=1e-5), k
    (other,) = directions(tr, 1, 8)
    assert not torch.allclose(other["fc.weight"], dr["fc.weight"])


def test_basin_width_by_hand():
    alphas = walk_points(5, 1.0)  # [-1, -0.5, 0, 0.5, 1]
    assert alphas == [-1.0, -0.5, 0.0, 0.5, 1.0]
    # +: doubles between 0.5 (loss 1.5) and 1 (loss 3): 0.5 + 0.5 * (2 - 1.5) / 1.5; -: never (censored at 1).
    w, censored = basin_width(alphas, [1.9, 1.2, 1.0, 1.5, 3.0])
    assert w == pytest.approx((0.5 + 0.5 / 3 + 1.0) / 2) and censored
    assert basin_width(alphas, [4.0, 2.0, 1.0, 2.0, 4.0]) == (0.5, False)
    # A loss that stops being finite (an overflow) ends a side, censored at its last finite point:
    # +: NaN at 0.5 -> 0; -: 1.5 at 0.5 has not doubled, NaN at 1 -> 0.5. Never interpolated across.
    assert basin_width(alphas, [math.nan, 1.5, 1.0, math.nan, 4.0]) == (0.25, True)
    assert basin_width(alphas, [math.inf, 1.5, 1.0, 1.2, 3.0]) == (
        pytest.approx((0.5 + 0.5 + 0.5 * 0.8 / 1.8) / 2),
        True,
    )


def test_strict_local_minima_of_a_grid_by_hand():
    # b = -1: 5 4 6 / b = 0: 3 1 2 / b = 1: 0.5 7 8 (a = -1, 0, 1): the centre and a corner.
    losses = [[5, 4, 6], [3, 1, 2], [0.5, 7, 8]]
    grid = {(a, b): float(losses[j][i]) for i, a in enumerate((-1, 0, 1)) for j, b in enumerate((-1, 0, 1))}
    assert local_minima(grid) == 2
    assert local_minima(dict.fromkeys(grid, 1.0)) == 0  # ties are not strict minima
    grid[(1, -1)] = 3.5  # below its neighbours 4 and 2? no (2 < 3.5): still 2
    assert local_minima(grid) == 2
    grid[(1, -1)] = 1.5  # below 4 and 2: a third
    assert local_minima(grid) == 3
    del grid[(0, 1)]  # a row cut short (an unfinished run): no count rather than a wrong one
    assert local_minima(grid) is None and local_minima({}) is None  # no grid: no count


def test_summaries_and_the_paired_report_of_a_residual_net_and_its_plain_twin(two_checkpoints, tmp_path):
    rows = run(two_checkpoints, tmp_path / "r", "--landscape-directions", "1")
    summ = {(r["checkpoint"].split(" ")[0], r["key"]): r["value"] for r in rows if r["walk"] == "summary"}
    for net in ("resnet14", "plain14"):
        pts = {r["alpha"]: r["loss"] for r in rows if r["walk"] == "1d" and r["checkpoint"].startswith(net)}
        assert summ[(net, "centre loss")] == pts[0.0]
        assert summ[(net, "rise at r")] == pytest.approx((pts[0.5] + pts[-0.5]) / 2 - pts[0.0])
        assert summ[(net, "rise at r/2")] == pytest.approx((pts[0.25] + pts[-0.25]) / 2 - pts[0.0])
    report = (tmp_path / "r" / "report.md").read_text()
    assert "Paired directions" in report and "resnet14" in report.split("Paired directions")[1].split("\n")[0]
    assert (tmp_path / "r" / "landscape.png").stat().st_size > 0


def test_points_whose_output_overflows_are_reported_as_such_and_the_report_completes(two_checkpoints, tmp_path):
    # At r = 1e8 the far points' activations overflow float32: their loss is not finite, and an
    # error read off NaN logits (argmax of NaN) would be a made-up number: it is NaN too.
    rows = run(two_checkpoints[:1], tmp_path / "r", "--landscape-directions", "1", "--landscape-radius", "1e8",
               "--landscape-images", "16")  # fmt: skip
    ckpt = load_checkpoint(two_checkpoints[0])
    x, y = sample(ckpt, 16, 0)
    theta = {k: p.detach().clone() for k, p in ckpt.model.named_parameters()}
    (d1,) = directions(theta, 1, 0)
    walk = {r["alpha"]: r for r in rows if r["walk"] == "1d"}
    assert sorted(walk) == [-1e8, -5e7, 0.0, 5e7, 1e8]
    nan_logits = 0
    for a, r in walk.items():
        model = create_model(ckpt.spec.name, num_classes=ckpt.spec.num_classes)
        model.load_state_dict({**ckpt.model.state_dict(), **{k: theta[k] + a * d1[k] for k in theta}})
        with torch.no_grad():
            logits = model.eval()(x)
        if torch.isnan(logits).any():
            nan_logits += 1
            assert math.isnan(r["error"]) and not math.isfinite(r["loss"]), r
        else:
            assert r["error"] == pytest.approx(100.0 * (logits.argmax(1) != y).float().mean().item()), r
    assert nan_logits >= 2  # the test reaches the overflow it is about
    summ = {r["key"]: r for r in rows if r["walk"] == "summary"}
    assert not math.isfinite(summ["rise at r"]["value"]) and summ["centre loss"]["value"] == walk[0.0]["loss"]
    # Basin width: a side whose loss stops being finite before it doubles is censored at its last
    # finite point, never read across the overflow.
    finite = [a for a, r in walk.items() if math.isfinite(r["loss"])]
    assert math.isfinite(summ["basin width"]["value"]) and summ["basin width"]["value"] <= max(map(abs, finite))
    report = (tmp_path / "r" / "report.md").read_text()
    table = report.split("Loss landscape (Li et al. 2018)")[1]
    assert "not finite at" in table and f"{5 - len(finite)} of 5 points have a loss that is not finite" in table
    assert (tmp_path / "r" / "landscape.png").stat().st_size > 0


def test_a_tiny_radius_keeps_its_half_and_full_radius_points_apart(two_checkpoints, tmp_path):
    # r = 1e-12: r/2 and r differ by less than any absolute tolerance; each is matched by its own value.
    rows = run(two_checkpoints[:1], tmp_path / "r", "--landscape-directions", "1", "--landscape-radius", "1e-12",
               "--landscape-images", "16")  # fmt: skip
    pts = {r["alpha"]: r["loss"] for r in rows if r["walk"] == "1d"}
    assert sorted(pts) == [-1e-12, -5e-13, 0.0, 5e-13, 1e-12]
    summ = {r["key"]: r["value"] for r in rows if r["walk"] == "summary"}
    assert summ["rise at r"] == pytest.approx((pts[1e-12] + pts[-1e-12]) / 2 - pts[0.0], abs=1e-12)
    assert summ["rise at r/2"] == pytest.approx((pts[5e-13] + pts[-5e-13]) / 2 - pts[0.0], abs=1e-12)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--landscape-grid", "4"], "odd and at least 3"),
        (["--landscape-grid", "1"], "odd and at least 3"),
        (["--landscape-radius", "0"], "> 0"),
        (["--landscape-radius", "nan"], "finite"),
        (["--landscape-radius", "inf"], "finite"),
        (["--landscape-directions", "0"], "landscape-directions"),
        (["--landscape-images", "-3"], "landscape-images"),
    ],
)
def test_bad_landscape_options_are_one_line_and_write_nothing(two_checkpoints, tmp_path, capsys, flags, words):
    out = tmp_path / "bad"
    assert_refused([two_checkpoints[0], "--out", str(out), "--studies", "landscape", *flags], capsys, words)
    assert not out.exists()


def assert_refused(argv, capsys, words):
    """Exit 2 with one error line (argparse's own flags: its usage line and the error)."""
    try:
        code = ablate_main([*argv, "--no-progress"])
    except SystemExit as e:  # argparse: a count flag below 1
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("error:") == 1 and words in err and "Traceback" not in err, err


def test_a_rerun_computes_nothing_and_a_killed_run_resumes_to_the_same_csv(two_checkpoints, tmp_path, monkeypatch):
    from resnet_lab.ablation.studies import landscape

    out = tmp_path / "r"
    run(two_checkpoints[:1], out)
    expected = (out / "results.csv").read_text()
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 5  # two walks and three grid rows: a kill loses at most one
    (out / "results.jsonl").write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    run(two_checkpoints[:1], out)
    assert (out / "results.csv").read_text() == expected

    def boom(*a, **k):
        raise AssertionError("a rerun evaluated a point")

    monkeypatch.setattr(landscape, "loss_error", boom)
    run(two_checkpoints[:1], out)
    assert (out / "results.csv").read_text() == expected


@pytest.mark.slow
def test_the_landscape_benchmark_times_each_way_on_the_same_point():
    """scripts/bench_geometry.py landscape: its own check (the study's point equals Li et al.'s
    way on the same images) passes, and every way is timed."""
    from .conftest import REPO

    argv = [sys.executable, "bench_geometry.py", "landscape", "--model", "resnet8", "--images", "40", "--rounds", "1"]
    r = subprocess.run(argv, cwd=REPO / "scripts", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert set(res["seconds_per_point"]) == {"study", "unfolded", "bare", "reference"}
    assert all(v > 0 for v in res["seconds_per_point"].values()) and res["grid21_points"] == 487


def test_a_grid_with_no_finite_loss_is_an_empty_panel_not_a_crash(tmp_path):
    # A checkpoint whose loss overflows even at its own weights: its grid has no finite point to
    # draw levels from. The report's figure says so in that panel; the other net is still drawn.
    from resnet_lab.ablation.studies import REGISTRY

    def point(ck, walk, a, b, loss):
        return {"study": "landscape", "checkpoint": ck, "walk": walk, "direction": 1 if walk == "1d" else 0,
                "alpha": a, "beta": b, "loss": loss}  # fmt: skip

    steps = (-1.0, 0.0, 1.0)
    rows = [point(ck, "2d", a, b, math.nan if ck == "bad" else 1.0 + a * a + b * b)
            for ck in ("bad", "good") for a in steps for b in steps]  # fmt: skip
    rows += [point(ck, "1d", a, 0.0, math.inf if ck == "bad" else 1.0 + a * a) for ck in ("bad", "good") for a in steps]
    name = REGISTRY["landscape"].plot(rows, tmp_path, {"bad": "C0", "good": "C1"}, 10)
    assert name and (tmp_path / "landscape.png").stat().st_size > 0
