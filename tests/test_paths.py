"""Veit et al. Sec. 5 / Fig. 6: path lengths, routed gradients, effective path range."""

import itertools
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from resnet_lab.ablation import paths
from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.train import cli_main

from .conftest import fit_args, trained_like
from .test_landscape import assert_refused

NETS = [
    ("cifar_resnet", dict(shortcut="A")),
    ("cifar_resnet", dict(shortcut="B")),
    ("cifar_resnet", dict(shortcut="C")),
    ("cifar_preact_resnet", dict(shortcut="A")),
    ("cifar_preact_resnet", dict(shortcut="B")),
    ("cifar_preact_resnet", dict(stochastic_depth="batch")),
]


def small(name, **kw):
    """6 blocks (64 paths), 4 channels, float64: the 2^n sum is exact to rounding."""
    return trained_like(name, depth=14, base_width=4, **kw).double()


def data(b=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, 16, 16, generator=g, dtype=torch.double), torch.tensor([1, 4, 7][:b])


def input_grad(m, x, y):
    h0 = m.forward_stem(x).detach().requires_grad_()
    F.cross_entropy(m.forward_from(h0, 0), y, reduction="sum").backward()
    return h0.grad


def naive_routed_grad(m, x, y, route):
    """One forward and backward per routing: the unrouted path of each block is detached."""
    h0 = m.forward_stem(x).detach().requires_grad_()
    h = h0
    for blk, through_branch in zip(m.blocks, route):
        b, s = blk.branch(h), blk.shortcut(h)
        h = blk.merge(b, s.detach()) if through_branch else blk.merge(b.detach(), s)
    F.cross_entropy(m.forward_head(h), y, reduction="sum").backward()
    return h0.grad


@pytest.mark.parametrize("name, kw", NETS)
def test_sum_over_all_2n_routings_is_the_input_gradient(name, kw):
    m = small(name, **kw)
    x, y = data()
    n = len(m.block_names)
    routes = torch.tensor(list(itertools.product([False, True], repeat=n)))
    logits, grads = paths.routed_input_grads(m, x, y, routes)
    assert grads.shape == (2**n, *m.forward_stem(x).shape)
    ref = input_grad(m, x, y)
    torch.testing.assert_close(grads.sum(0), ref, rtol=1e-10, atol=1e-12)
    assert ref.abs().max() > 1e-3  # not a vacuous zero


@pytest.mark.parametrize("name, kw", NETS[::2])
def test_each_routing_equals_a_separate_forward_backward(name, kw):
    m = small(name, **kw)
    x, y = data()
    routes = paths.sample_routes(6, 2, 3, random.Random(0))
    routes = torch.cat([routes, torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)])
    _, grads = paths.routed_input_grads(m, x, y, routes)
    for r, g in zip(routes, grads):
        torch.testing.assert_close(g, naive_routed_grad(m, x, y, r.tolist()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, kw", NETS[2:4])
def test_routing_leaves_the_forward_pass_unchanged(name, kw):
    m = small(name, **kw)
    x, y = data()
    with torch.no_grad():
        before = m(x)
    for k in (0, 3, 6):
        logits, _ = paths.routed_input_grads(m, x, y, paths.sample_routes(6, k, 4, random.Random(k)))
        assert torch.equal(logits, before)
    with torch.no_grad():
        assert torch.equal(m(x), before)  # and the model itself is untouched


def test_binomial_total_gradient_and_effective_range():
    pmf = paths.path_length_pmf(54)
    assert sum(pmf) == pytest.approx(1.0) and pmf[27] == pytest.approx(math.comb(54, 27) / 2**54)
    share = paths.total_gradient([0.25, 0.5, 0.25], [4.0, 1.0, 0.5])  # mass 1, 0.5, 0.125
    assert share == pytest.approx([1 / 1.625, 0.5 / 1.625, 0.125 / 1.625])
    assert paths.effective_range([0.05, 0.5, 0.41, 0.04]) == (1, 2, pytest.approx(0.91))
    # A tie in width goes to the window holding more.
    assert paths.effective_range([0.46, 0.45, 0.09], 0.9)[:2] == (0, 1)
    assert paths.effective_range([0.2, 0.2, 0.2, 0.2, 0.2])[:2] == (0, 4)


def test_path_study_rows_and_short_paths_in_a_preact_net():
    m = trained_like("preact_resnet20", depth=20, base_width=4)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    rows = paths.path_study(m, [(x[:8], y[:8]), (x[8:], y[8:])], samples=3, seed=0)
    lengths, (rng,) = rows[:-1], rows[-1:]
    assert [r["k"] for r in lengths] == list(range(10))
    assert all(r["grad_n"] == 3 * 16 for r in lengths)
    assert sum(r["total_share"] for r in lengths) == pytest.approx(1.0)
    assert rng["key"] == "effective range" and rng["range_gradient_share"] >= 0.9
    inside = lengths[rng["range_lo"] : rng["range_hi"] + 1]
    assert rng["range_path_share"] == pytest.approx(sum(r["path_fraction"] for r in inside))
    # Recomputed by hand from the routed gradients of one length.
    _, g = paths.routed_input_grads(m, x[:8], y[:8], paths.sample_routes(9, 4, 3, random.Random("0:4:0")))
    _, g2 = paths.routed_input_grads(m, x[8:], y[8:], paths.sample_routes(9, 4, 3, random.Random("0:4:1")))
    norms = torch.cat([g.flatten(2).norm(dim=2).flatten(), g2.flatten(2).norm(dim=2).flatten()]).double()
    assert lengths[4]["grad_mean"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert lengths[4]["grad_std"] == pytest.approx(norms.std().item(), rel=1e-5)


def test_plain_net_is_refused_by_the_api():
    with pytest.raises(paths.PathsError, match="plain net"):
        paths.routed_input_grads(small("cifar_resnet", plain=True), *data(), torch.ones(1, 6, dtype=torch.bool))


@pytest.fixture(scope="module")
def preact_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("preact")
    arch = ["--model.arch", "cifar_preact_resnet", "--model.depth", "8"]
    cli_main(fit_args(root, *arch, "--run.test_after_fit", "false", logger="none"))
    (p,) = (root / "runs" / "preact_resnet8").glob("*/checkpoints/last.ckpt")
    return str(p)


def test_ablate_paths_end_to_end(preact_checkpoint, two_checkpoints, tmp_path):
    out = tmp_path / "rep"
    args = [preact_checkpoint, two_checkpoints[1], "--out", str(out), "--studies", "single", "paths", "--samples", "3",
            "--paths-images", "20", "--limit", "40", "--batch-size", "16", "--no-progress"]  # fmt: skip
    assert ablate_main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    pr = [r for r in rows if r["study"] == "paths" and r["spec"] == "preact_resnet8"]
    ks = [r for r in pr if r["key"].startswith("k=")]
    assert [r["k"] for r in ks] == [0, 1, 2, 3]
    assert all(r["images"] == 20 and r["grad_n"] == 60 and r["grad_mean"] > 0 for r in ks)
    assert sum(r["total_share"] for r in ks) == pytest.approx(1.0)
    (rng,) = [r for r in pr if r["key"] == "effective range"]
    plain = [r for r in rows if r["study"] == "paths" and r["spec"] == "plain14"]
    assert [(r["key"], r["applicable"]) for r in plain] == [("not applicable", False)]
    assert "grad_mean" not in plain[0] and "total_share" not in plain[0]  # never a zero
    csv_text = (out / "results.csv").read_text()
    assert "effective range" in csv_text and "not applicable" in csv_text
    md = (out / "report.md").read_text()
    assert "## Path lengths and the gradient" in md and "![paths.png](paths.png)" in md
    assert f"{rng['range_lo']}–{rng['range_hi']}" in md and "not applicable (plain net" in md
    assert (out / "paths.png").stat().st_size > 10_000
    assert "Path lengths and the gradient" in (out / "report.html").read_text()
    # Resumable: a rerun recomputes nothing.
    stored = (out / "results.jsonl").read_text()
    assert ablate_main(args) == 0
    assert (out / "results.jsonl").read_text() == stored


def test_paths_bad_inputs_give_one_clear_error(two_checkpoints, tmp_path, capsys):
    assert_refused([str(two_checkpoints[1]), "--out", str(tmp_path / "a"), "--studies", "paths"], capsys,
                   "needs a residual net: every checkpoint given is plain")  # fmt: skip
    assert_refused([str(two_checkpoints[0]), "--out", str(tmp_path / "b"), "--studies", "pathz"], capsys,
                   "invalid choice: 'pathz'")  # fmt: skip
    assert_refused([str(two_checkpoints[0]), "--out", str(tmp_path / "c"), "--studies", "paths", "--paths-images",
                    "0"], capsys, "--paths-images")  # fmt: skip
    assert not any((tmp_path / d).exists() for d in "abc")


def test_ablate_logs_the_paths_study_to_wandb_offline(two_checkpoints, tmp_path):
    from .wandb_offline import read_offline_run

    out = tmp_path / "rep"
    args = [two_checkpoints[0], "--out", str(out), "--studies", "paths", "--samples", "2", "--paths-images", "8",
            "--no-progress", "--wandb"]  # fmt: skip
    assert ablate_main(args) == 0
    run = read_offline_run(out)
    assert "ablation/paths/_type" in {k for row in run["history"] for k in row}  # the Fig. 6 plot
    (rng,) = [r for r in json.loads((out / "results.json").read_text()) if r["key"] == "effective range"]
    label = rng["checkpoint"]
    assert run["summary"][f"{label}/lesion/paths_range_lo"] == rng["range_lo"]
    assert run["summary"][f"{label}/lesion/paths_range_hi"] == rng["range_hi"]
    assert run["summary"][f"{label}/lesion/paths_path_share"] == pytest.approx(rng["range_path_share"])


def test_norms_match_the_full_gradients_and_shared_suffixes_change_nothing():
    m = small("cifar_preact_resnet", shortcut="B")
    x, y = data()
    routes = torch.tensor(list(itertools.product([False, True], repeat=6)))[torch.randperm(64)]  # shuffled order
    _, grads = paths.routed_input_grads(m, x, y, routes)
    norms = paths.routed_input_grad_norms(m, x, y, routes)
    torch.testing.assert_close(norms, grads.flatten(2).norm(dim=2), rtol=1e-12, atol=0)
    one = paths.routed_input_grads(m, x, y, routes[5:6])[1][0]  # a routing alone = within the batch
    torch.testing.assert_close(one, grads[5], rtol=0, atol=0)


def test_a_study_frees_its_activations_without_the_garbage_collector():
    import gc
    import weakref

    m = small("cifar_preact_resnet")
    x, y = data()
    routes = paths.sample_routes(6, 3, 4, random.Random(0))
    saved = []

    def pack(t):
        d = t.detach()  # what the graph holds: alive exactly as long as the graph is
        saved.append(weakref.ref(d))
        return d

    gc.disable()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            paths.routed_input_grad_norms(m, x, y, routes)
        # The activations saved for the backward must die with the call, not wait for a
        # garbage collection (a reference cycle kept them: 21 GB in `ablate` on preact-110).
        alive = [r for r in saved if r() is not None]
        assert saved and not alive, f"{len(alive)} of {len(saved)} saved tensors still alive"
    finally:
        gc.enable()
