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
            g = torch.autograd.grad(F.cross_entropy(model.forward_from(h, i), y, reduction="sum"), h)[0]
            if out.shape != h.shape:
                return None, None
            f, r = out - h, h
        elif blk.downsample is None:
            g = torch.autograd.grad(F.cross_entropy(model.forward_from(h, i), y, reduction="sum"), h)[0]
            f, r = blk.branch(h), h
        else:
            s = blk.shortcut(h).detach().requires_grad_()
            f = blk.branch(h)
            logits = model.forward_from(blk.merge(f, s), i + 1)
            g = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), s)[0]
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
    torch.testing.assert_close(probe.weight, torch.from_numpy(ref.coef_.T.copy()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probe.bias, torch.from_numpy(ref.intercept_.copy()), rtol=1e-4, atol=1e-5)
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
