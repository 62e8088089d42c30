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
