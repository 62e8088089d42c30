"""The representation studies (iterative, probes, cka) against naive references."""

import csv

import pytest
import torch
import torch.nn.functional as F

from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.studies.iterative import block_steps

from .conftest import trained_like
from .test_studies import write_checkpoint

NETS = [
    ("resnet14", {}),
    ("resnet14", {"shortcut": "B"}),
    ("preact_resnet14", {}),
    ("preact_resnet14", {"shortcut": "C"}),
    ("plain14", {}),
    ("preact_plain14", {}),
]


def naive_steps(model, x, y, i):
    """Block i alone: its input from a forward to it, its gradient from a forward and backward
    from it (from the shortcut output for a residual downsampling block)."""
    blk = model.blocks[i]
    with torch.no_grad():
        h = model.forward_until(x, i)
    h = h.clone().requires_grad_()
    with torch.enable_grad():
        if blk.plain:
            out = blk(h)
            g = torch.autograd.grad(F.cross_entropy(model.forward_from(h, i).double(), y, reduction="sum"), h)[0]
            if out.shape != h.shape:
                return None, None
            f, r = out - h, h
        elif blk.downsample is None:
            g = torch.autograd.grad(F.cross_entropy(model.forward_from(h, i).double(), y, reduction="sum"), h)[0]
            f, r = blk.branch(h), h
        else:
            s = blk.shortcut(h).detach().requires_grad_()
            f = blk.branch(h)
            logits = model.forward_from(blk.merge(f, s), i + 1)
            g = torch.autograd.grad(F.cross_entropy(logits.double(), y, reduction="sum"), s)[0]
            r = s
    f, r, g = (t.detach().flatten(1).double() for t in (f, r, g))
    return F.cosine_similarity(f, g, dim=1), f.norm(dim=1) / r.norm(dim=1)


@pytest.mark.parametrize("name, kw", NETS)
def test_iterative_equals_one_forward_and_backward_per_block(name, kw):
    model = trained_like(name, **kw)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    steps = block_steps(model, x, y)
    assert len(steps) == len(model.block_names)
    for i, s in enumerate(steps):
        cos, ratio = naive_steps(model, x, y, i)
        if cos is None:
            assert s["cos"] is None and model.blocks[i].plain and model.block_names[i] in model.downsample_blocks
            continue
        torch.testing.assert_close(s["cos"], cos, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s["ratio"], ratio, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_iterative_rows_report_and_resume(tmp_path):
    cks = [write_checkpoint(tmp_path / n / "net.ckpt", n) for n in ("preact_resnet14", "plain14")]
    args = ["--studies", "iterative", "--limit", "40", "--batch-size", "20", "--no-progress"]
    assert ablate_main([*cks, "--out", str(tmp_path / "rep"), *args]) == 0
    with open(tmp_path / "rep" / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["study"] == "iterative"]
    assert len(rows) == 2 * 6 and {r["images"] for r in rows} == {"40"}
    plain = [r for r in rows if r["plain"] == "True"]
    assert [r["applicable"] for r in plain] == ["True", "True", "False", "True", "False", "True"]
    res = [r for r in rows if r["plain"] == "False"]
    assert all(-1 <= float(r["cos_mean"]) <= 1 and float(r["ratio_mean"]) > 0 for r in res)
    # The stored means are those of the per-image values of block_steps on the same images.
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Iterative refinement" in md and "iterative.png" in md
    import re

    table = [ln for ln in md.split("## Iterative")[1].split("##")[0].splitlines() if ln.startswith("|")]
    cols = {len(re.findall(r"(?<!\\)\|", ln)) for ln in table}
    assert len(table) == 2 + 6 and cols == {2 + 2 + 1}, table  # position, block, two nets: every row as wide
    assert (tmp_path / "rep" / "iterative.png").exists()
    before = (tmp_path / "rep" / "results.jsonl").read_text()
    assert ablate_main([*cks, "--out", str(tmp_path / "rep"), *args]) == 0
    assert (tmp_path / "rep" / "results.jsonl").read_text() == before  # nothing recomputed


@pytest.mark.parametrize("name", ["resnet14", "preact_plain14"])
def test_probe_features_are_the_block_outputs_of_one_forward(name):
    from resnet_lab.ablation.studies.probes import pooled_features

    model = trained_like(name)
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    feats, labels = pooled_features(model, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert list(feats) == ["stem", *model.block_names] and torch.equal(labels, y)
    with torch.no_grad():
        for i, b in enumerate(model.block_names):  # naive: a forward up to each block's output
            h = model.forward_until(x, i + 1)
            torch.testing.assert_close(feats[b], h.mean((2, 3)).double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats["stem"], model.forward_stem(x).mean((2, 3)).double())


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_probe_equals_scikit_learn_logistic_regression(l2):
    sklearn = pytest.importorskip("sklearn.linear_model")
    from resnet_lab.ablation.studies.probes import fit_probe

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (400,), generator=g)
    x = 3 + 2 * (centres[y] + 1.5 * torch.randn(400, 12, generator=g, dtype=torch.float64))
    probe = fit_probe(x, y, 4, l2)
    z = ((x - probe.mean) / probe.std).numpy()
    ref = sklearn.LogisticRegression(C=1 / (len(y) * l2), tol=1e-10, max_iter=10_000).fit(z, y.numpy())
    torch.testing.assert_close(probe.weight, torch.from_numpy(ref.coef_.T.copy()), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(probe.bias, torch.from_numpy(ref.intercept_.copy()), rtol=1e-3, atol=1e-4)
    xt = 3 + 2 * (centres[y] + 1.5 * torch.randn(400, 12, generator=g, dtype=torch.float64))
    zt = ((xt - probe.mean) / probe.std).numpy()
    assert (probe.logits(xt).argmax(1).numpy() == ref.predict(zt)).all()


def test_probe_l2_is_chosen_on_training_images_only(tmp_path):
    """Scoring on the evaluation split never feeds back: the same probes come out whatever
    the evaluation images, and the rows say how many images each stands on."""
    ck = write_checkpoint(tmp_path / "resnet8" / "net.ckpt", "resnet8")
    args = ["--studies", "probes", "--probe-images", "300", "--batch-size", "50", "--no-progress"]
    rows = {}
    for limit in ("60", "120"):
        assert ablate_main([ck, "--out", str(tmp_path / limit), "--limit", limit, *args]) == 0
        with open(tmp_path / limit / "results.csv") as f:
            rows[limit] = [r for r in csv.DictReader(f) if r["study"] == "probes"]
    assert [r["key"] for r in rows["60"]] == ["stem", "layer1.0", "layer2.0", "layer3.0"]
    assert [r["l2"] for r in rows["60"]] == [r["l2"] for r in rows["120"]]
    assert [r["train_error"] for r in rows["60"]] == [r["train_error"] for r in rows["120"]]
    assert {r["n"] for r in rows["60"]} == {"60"} and {r["train_images"] for r in rows["60"]} == {"300"}
    for r in rows["120"]:
        assert int(r["wrong"]) == round(float(r["error"]) * 120 / 100)


# -- cka ----------------------------------------------------------------------------
def _u_statistic_hsic(k, l):  # noqa: E741
    """The unbiased HSIC as its U-statistic definition (Song et al. 2012): the mean over
    4-subsets {i, j, q, r} of the kernel averaged over their 24 orderings."""
    import itertools

    n, total, subsets = k.shape[0], 0.0, 0
    for quad in itertools.combinations(range(n), 4):
        h = 0.0
        for i, j, q, r in itertools.permutations(quad):
            h += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        total += h / 24
        subsets += 1
    return total / subsets


def _full_batch_cka(x, y):
    """Kornblith et al.'s linear CKA of centred features, ||Y^T X||^2 / (||X^T X|| ||Y^T Y||)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_minibatch_hsic_is_the_u_statistic():
    from resnet_lab.ablation.studies.cka import grams, hsic1

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    kx, ky = grams([x]), grams([y])
    assert float(hsic1(kx, ky)[0, 0]) == pytest.approx(float(_u_statistic_hsic(kx[0], ky[0])), rel=1e-10)


def test_minibatch_cka_agrees_with_the_full_batch_formula_and_its_invariances():
    from resnet_lab.ablation.studies.cka import minibatch_cka

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 10, generator=g, dtype=torch.float64)
    y = x @ torch.randn(10, 6, generator=g, dtype=torch.float64) + 0.8 * torch.randn(2048, 6, generator=g).double()
    batches = lambda *ts: [[t[i : i + 256] for t in ts] for i in range(0, 2048, 256)]  # noqa: E731
    m = minibatch_cka(batches(x, y))
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == pytest.approx(1.0)  # CKA(X, X) = 1
    assert float(m[0, 1]) == pytest.approx(_full_batch_cka(x, y), abs=0.01)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    moved = minibatch_cka(batches(x @ q * 7.5, y))  # an orthogonal transform and isotropic scaling
    torch.testing.assert_close(moved, m, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_cka_study_within_across_and_without(tmp_path):
    from resnet_lab.ablation.studies.cka import CKA, minibatch_cka

    cks = [write_checkpoint(tmp_path / n / "net.ckpt", n) for n in ("resnet8", "plain14")]
    args = ["--studies", "cka", "--cka-without", "layer1.1", "--limit", "300", "--batch-size", "100", "--no-progress"]
    assert ablate_main([cks[1], cks[0], "--out", str(tmp_path / "rep"), *args]) == 2  # resnet8 has no layer1.1
    assert not (tmp_path / "rep" / "results.jsonl").exists()  # refused before plain14 (first) was evaluated
    args[3] = "layer1.0"
    assert ablate_main([*cks, "--out", str(tmp_path / "r"), *args]) == 0
    with open(tmp_path / "r" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.update(pos_a=int(r["pos_a"]), pos_b=int(r["pos_b"]), cka=float(r["cka"]))
    mats = CKA.matrices(rows)
    assert set(mats) == {
        ("resnet8 [net]", "within"), ("resnet8 [net]", "without layer1.0"),
        ("plain14 [net]", "within"), ("plain14 [net]", "without layer1.0"), ("plain14 [net]", "vs resnet8 [net]"),
    }  # fmt: skip
    assert mats[("plain14 [net]", "vs resnet8 [net]")].shape == (7, 4)
    within = mats[("resnet8 [net]", "within")]
    torch.testing.assert_close(torch.diagonal(within), torch.ones(4, dtype=torch.float64))
    # The reference: naive forwards up to each block (CIFAR test images as ablate reads them).
    from resnet_lab.ablation.runner import batches, build_datamodule, load_checkpoint

    a, b = load_checkpoint(cks[0]), load_checkpoint(cks[1])
    dm = build_datamodule(a.data, augment=False, eval_batch_size=100, batch_size=100)
    dm.setup("test")
    xs = [x for x, _ in batches(dm, "test", 300)]
    chunks = [torch.cat(xs)[i : i + 256] for i in (0, 256)]
    with torch.no_grad():
        reps = lambda m, x: [m.forward_stem(x)] + [m.forward_until(x, i + 1) for i in range(len(m.block_names))]  # noqa: E731
        ref_within = minibatch_cka([reps(a.model, x) for x in chunks])
        ref_vs = minibatch_cka([reps(b.model, x) for x in chunks], [reps(a.model, x) for x in chunks])
    torch.testing.assert_close(within, ref_within, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(mats[("plain14 [net]", "vs resnet8 [net]")], ref_vs, rtol=1e-6, atol=1e-9)
    # without: this net's intact outputs (rows) against the lesioned net's (columns)
    intact = [reps(a.model, x) for x in chunks]
    with a.model.remove_blocks(["layer1.0"]), torch.no_grad():
        lesioned = [reps(a.model, x) for x in chunks]
    ref = minibatch_cka(intact, lesioned)
    torch.testing.assert_close(mats[("resnet8 [net]", "without layer1.0")], ref, rtol=1e-6, atol=1e-9)
    assert (tmp_path / "r" / "cka.png").exists() and "linear CKA" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.slow
def test_representation_studies_in_a_sweep_and_on_wandb(tmp_path):
    """ablation.studies: [iterative, probes, cka] in a sweep: the trial records each study's
    summary, and `ablate --wandb` logs the summaries and the plots to the offline run."""
    from optuna.trial import TrialState

    from resnet_lab.sweep.cli import main as sweep_main

    from .conftest import REPO, load, tiny_config
    from .wandb_offline import read_offline_run

    cfg = tiny_config(
        tmp_path,
        {
            "study_name": "rep",
            "metric": "lesion/probe_last_error",
            "ablation": {"studies": ["iterative", "probes", "cka"], "limit": 60, "probe_images": 200},
            "space": {"model.depth": [8], "model.plain": [False, True]},
        },
    )
    assert sweep_main(["--config", str(REPO / "sweeps/depth.yaml"), "--config", cfg]) == 0
    done = [t for t in load(tmp_path, "rep").trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    for t in done:
        a = t.user_attrs
        assert 0 <= a["lesion/probe_last_error"] <= 100 and t.value == a["lesion/probe_last_error"]
        assert -1 <= a["lesion/iterative_mean_cos"] <= 1 and 0 < a["lesion/cka_first_last"] <= 1

    ck = write_checkpoint(tmp_path / "resnet8" / "net.ckpt", "resnet8")
    out = tmp_path / "rep"
    argv = [ck, "--out", str(out), "--studies", "iterative", "probes", "cka", "--probe-images", "200"]
    assert ablate_main([*argv, "--limit", "60", "--no-progress", "--wandb"]) == 0
    run = read_offline_run(out)
    logged = {k for row in run["history"] for k in row}
    assert {"ablation/iterative/_type", "ablation/probes/_type", "ablation/cka/_type"} <= logged
    rows = json_rows(out)
    probes = sorted((r for r in rows if r["study"] == "probes"), key=lambda r: r["position"])
    label = probes[-1]["checkpoint"]  # each checkpoint's values under its own label
    assert run["summary"][f"{label}/lesion/probe_last_error"] == probes[-1]["error"]
    assert {f"{label}/lesion/iterative_mean_cos", f"{label}/lesion/cka_adjacent_mean"} <= set(run["summary"])


def json_rows(out):
    import json

    return json.loads((out / "results.json").read_text())


def test_representation_studies_pool_across_checkpoints_of_one_architecture(tmp_path):
    """Two checkpoints of one architecture (e.g. two seeds): each new study's per-block values
    are pooled, with n = 2, into results_by_arch.csv and the report."""
    cks = [write_checkpoint(tmp_path / f"seed{i}" / "net.ckpt", "resnet8", seed=i) for i in (0, 1)]
    argv = [*cks, "--out", str(tmp_path / "r"), "--studies", "iterative", "probes", "cka", "--probe-images", "100"]
    assert ablate_main([*argv, "--limit", "40", "--no-progress"]) == 0
    with open(tmp_path / "r" / "results_by_arch.csv") as f:
        agg = list(csv.DictReader(f))
    by = {(a["study"], a["key"]): a for a in agg}
    assert {"iterative", "probes", "cka"} <= {a["study"] for a in agg}
    assert by[("probes", "probe layer3.0")]["n_checkpoints"] == "2"
    assert ("iterative", "cos layer2.0") in by and ("cka", "cka stem ~ layer1.0") in by
    with open(tmp_path / "r" / "results.csv") as f:
        probe = [r for r in csv.DictReader(f) if r["study"] == "probes" and r["key"] == "layer3.0"]
    assert float(by[("probes", "probe layer3.0")]["mean"]) == pytest.approx(sum(float(r["error"]) for r in probe) / 2)
    assert (tmp_path / "r" / "across_seeds.png").exists()
    # Each pooled value says what it is (issue 24 §1): the report labelled cosines "errors in %",
    # and printed them with two decimals as "0.00 ± 0.00".
    assert by[("probes", "probe layer3.0")]["measure"] == "top-1 error (%)"
    assert by[("iterative", "cos layer2.0")]["measure"] == "cos(f, dL/dh)"
    assert by[("iterative", "ratio layer2.0")]["measure"] == "||f|| / ||h||"
    assert by[("cka", "cka stem ~ layer1.0")]["measure"] == "linear CKA"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "errors in %" not in md
    cos = float(by[("iterative", "cos layer2.0")]["mean"])
    line = next(x for x in md.splitlines() if "| cos layer2.0 |" in x)
    assert "| cos(f, dL/dh) | 2 |" in line and f"{cos:.4f} ± " in line


def test_probe_l2_is_scored_on_images_it_was_not_fit_on(monkeypatch):
    # Issue 24 §8: a mutation that scored L2 on the fit images themselves (no held-out fifth) passed.
    from resnet_lab.ablation.studies import probes

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    fitted, scored = [], []
    real_fit, real_logits = probes.fit_probe, probes.Probe.logits

    def fit(xf, yf, classes, l2, **kw):
        fitted.append(xf)
        return real_fit(xf, yf, classes, l2, max_iter=5)

    def logits(self, xs):
        scored.append(xs)
        return real_logits(self, xs)

    monkeypatch.setattr(probes, "fit_probe", fit)
    monkeypatch.setattr(probes.Probe, "logits", logits)
    probes.choose_l2(x, y, 3, torch.Generator().manual_seed(1))
    assert len(fitted) == len(scored) == len(probes.L2_GRID)
    rows = lambda t: {tuple(r.tolist()) for r in t}  # noqa: E731
    for f, s in zip(fitted, scored):
        assert rows(f).isdisjoint(rows(s)) and len(s) == 12 and len(f) == 48  # the held-out fifth, apart


def test_iterative_counts_a_block_that_does_not_move_like_a_zero_gradient(tmp_path):
    # Issue 24 §8: a block whose step f is 0 gave cos = 0/0 = NaN, and the block's mean became NaN.
    from resnet_lab.ablation.studies.iterative import Iterative

    model = trained_like("resnet14")
    blk = model.blocks[1]
    with torch.no_grad():  # the branch's last BN outputs 0: f = 0 for every image
        last_bn = [m for m in blk.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        last_bn.weight.zero_()
        last_bn.bias.zero_()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    steps = block_steps(model, x, y)
    assert steps[1]["ok"].sum() == 0 and steps[0]["ok"].all()  # nothing to take a cosine of

    class Ctx:  # the study context's surface the study uses, over these 8 images
        progress = None

        def __init__(self):
            self.model = model

        def batches(self):
            return [(x, y)]

        def row(self, bn="eval", **fields):
            return {"study": "iterative", "condition": f"{bn}-bn", **fields}

    rows = Iterative().rows(Ctx())
    assert rows[1]["cos_n"] == 0 and rows[1]["cos_mean"] is None  # counted out, not NaN
    assert rows[0]["cos_n"] == 8 and -1 <= rows[0]["cos_mean"] <= 1
    assert Iterative().summary(rows)["lesion/iterative_mean_cos"] == pytest.approx(
        sum(r["cos_mean"] for r in rows if r["cos_mean"] is not None) / sum(r["cos_mean"] is not None for r in rows)
    )
