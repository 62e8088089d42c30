"""The `hessian` study: Lanczos, Hutchinson and SLQ against the explicit Hessian of a tiny net."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_lab.ablation.studies import hessian
from resnet_lab.ablation.studies.hessian import (
    ProductConv,
    affine_bns,
    density,
    for_products,
    graph_bytes,
    hutchinson,
    lanczos,
    make_hvp,
)
from resnet_lab.models import build
from resnet_lab.models.convnext import ConvNeXtSpec
from resnet_lab.models.vit import ViTSpec

from .conftest import trained_like
from .test_landscape import assert_refused


@pytest.fixture(scope="module")
def tiny():
    """A resnet8 of width 2 (1,356 weights), eval mode, 16 images of 8x8, and its explicit Hessian."""
    torch.manual_seed(0)
    model = trained_like("resnet8", base_width=2)
    model.eval()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss_of(v):
        ps = {n: t.view(s).float() for n, t, s in zip(names, torch.split(v, [s.numel() for s in shapes]), shapes)}
        buffers = dict(model.named_buffers())
        return F.cross_entropy(torch.func.functional_call(model, {**buffers, **ps}, (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, flat).double()
    H = (H + H.T) / 2
    return model, [(x, y)], H


def test_hvp_equals_the_explicit_hessian_times_v_whole_and_per_stage(tiny):
    model, data, H = tiny
    names = [n for n, _ in model.named_parameters()]
    v = torch.randn(H.shape[0], dtype=torch.float64)
    hvp = make_hvp(model, F.cross_entropy, data, names)
    assert torch.allclose(hvp(v), H @ v, rtol=1e-4, atol=1e-6)
    offsets, i = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = range(i, i + p.numel())
        i += p.numel()
    for group, gnames in model.parameter_groups().items():
        idx = torch.tensor([j for n in gnames for j in offsets[n]])
        sub = make_hvp(model, F.cross_entropy, data, gnames)
        u = torch.randn(len(idx), dtype=torch.float64)
        assert torch.allclose(sub(u), H[idx][:, idx] @ u, rtol=1e-4, atol=1e-6), group


def test_a_block_of_products_equals_the_products_one_by_one_and_the_explicit_hessian(tiny):
    model, data, H = tiny
    hvp = make_hvp(model, F.cross_entropy, [*data, *data], [n for n, _ in model.named_parameters()])  # two chunks
    V = torch.randn(H.shape[0], 5, dtype=torch.float64)
    block = hvp(V)
    assert block.shape == V.shape
    for k in range(5):
        assert torch.equal(block[:, k], hvp(V[:, k]))  # the kept graph gives each vector its own product
    assert torch.allclose(block, H @ V, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block", [2, 7, 8])
def test_hutchinson_in_blocks_draws_the_same_vectors_and_gives_the_same_trace(tiny, block):
    _, _, H = tiny
    seen = {1: [], block: []}

    def matvec(b):
        return lambda V: (seen[b].append(V.reshape(len(V), -1).T.clone()), H @ V)[1]

    one = hutchinson(matvec(1), H.shape[0], 0.05, 45, torch.Generator().manual_seed(3))
    many = hutchinson(matvec(block), H.shape[0], 0.05, 45, torch.Generator().manual_seed(3), block)
    assert torch.equal(torch.cat(seen[1]), torch.cat(seen[block]))  # the same vectors in the same order
    assert max(len(v) for v in seen[block]) == block and one.samples == many.samples
    assert many.mean == pytest.approx(one.mean, rel=1e-12) and many.hi == pytest.approx(one.hi, rel=1e-12)


def test_products_through_affine_bns_keep_the_function_the_names_and_the_hessian(tiny):
    model, data, H = tiny
    ready = for_products(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ready.modules())
    convs = sum(type(m) is torch.nn.Conv2d for m in model.modules())
    assert sum(isinstance(m, ProductConv) for m in ready.modules()) == convs > 0
    assert [n for n, _ in ready.named_parameters()] == [n for n, _ in model.named_parameters()]
    hvp = make_hvp(ready, F.cross_entropy, data, [n for n, _ in ready.named_parameters()])
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert torch.allclose(hvp(V), H @ V, rtol=1e-4, atol=1e-6)  # BN's weights and biases included
    # the function: running statistics far from (0, 1), variances small enough that eps counts
    bent = copy.deepcopy(model)
    for m in bent.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(1e-3, 1e-1)
    x = data[0][0]
    with torch.no_grad():
        want = bent(x)
        assert (for_products(copy.deepcopy(bent))(x) - want).norm() <= 1e-6 * want.norm()


@pytest.mark.parametrize("net", ["resnet8 B", "preact_resnet8", "convnext", "vit"])
def test_product_convolutions_give_pytorchs_own_products_on_every_family(net):
    """ProductConv's double backward against PyTorch's own, in float64: strides, 1x1 option-B
    shortcuts, pre-activation, ConvNeXt's depthwise convolutions with biases and its 2x2
    downsampling, a ViT's patch convolution; the whole Hessian and a stage's block."""
    if net == "convnext":
        model = build(ConvNeXtSpec(stage_depths=(1, 1, 1, 1), widths=(4, 8, 8, 12))).eval()
    elif net == "vit":
        model = build(ViTSpec(depth=2, image_size=32, patch_size=8, width=16, heads=2, mlp_dim=32)).eval()
    else:
        name, _, shortcut = net.partition(" ")
        model = trained_like(name, base_width=4, **({"shortcut": shortcut} if shortcut else {}))
    model = model.double().to(memory_format=torch.contiguous_format)
    ready = for_products(copy.deepcopy(model))
    assert any(isinstance(m, ProductConv) for m in ready.modules())
    own = affine_bns(copy.deepcopy(model))  # the same function, with PyTorch's convolutions
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)
    with torch.no_grad():
        assert torch.allclose(ready(x), own(x), rtol=1e-12, atol=1e-12)
    groups = model.parameter_groups()
    for names in ([n for n, _ in model.named_parameters()], groups[sorted(set(groups) - {"other"})[0]]):
        want = make_hvp(own, F.cross_entropy, [(x, y)], names)
        V = torch.randn(want.dim, 2, generator=g, dtype=torch.float64)
        got, ref = make_hvp(ready, F.cross_entropy, [(x, y)], names)(V), want(V)
        assert (got - ref).norm() <= 1e-10 * ref.norm()


def test_chunks_keep_a_graph_of_at_most_graph_bytes_and_give_the_same_products(tiny, monkeypatch):
    model, data, H = tiny
    (x, y), ps = data[0], list(model.parameters())
    sizes = [graph_bytes(model, F.cross_entropy, x[:k], y[:k], ps) for k in (1, 2, 3, 5)]
    per = sizes[1] - sizes[0]
    assert per > 0 and sizes[2] - sizes[1] == per and sizes[3] - sizes[2] == 2 * per  # one image's share, linear

    def forward_bytes(k: int) -> int:  # what the forward alone saves: the create_graph backward saves more
        seen: dict[int, Tensor] = {}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.setdefault(t.untyped_storage().data_ptr(), t),
                                                      lambda t: t):  # fmt: skip
            F.cross_entropy(model(x[:k]), y[:k], reduction="sum")
        return sum(t.untyped_storage().nbytes() for t in seen.values())

    assert per > 1.5 * (forward_bytes(2) - forward_bytes(1)) > 0
    assert (
        make_hvp(model, F.cross_entropy, data, [n for n, _ in model.named_parameters()]).chunk == hessian.CHUNK
    )  # most
    monkeypatch.setattr(hessian, "GRAPH_BYTES", 3 * per + per // 2)
    hvp = make_hvp(model, F.cross_entropy, data, [n for n, _ in model.named_parameters()])
    assert hvp.chunk == 3  # 16 images: five chunks of 3 and one of 1
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert torch.allclose(hvp(V), H @ V, rtol=1e-4, atol=1e-6)


def test_a_bn_folded_into_a_convolution_with_a_bias_keeps_the_function_and_the_products():
    """conv(x, W s) + (c s + t): the conv's own bias c too, and the BN's parameters under their names."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 10))  # fmt: skip
    model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.1, 2), model[1].bias.data.uniform_(-1, 1)
    model = model.double().eval()
    ready = for_products(copy.deepcopy(model))
    assert isinstance(ready[0], ProductConv) and isinstance(ready[1], hessian.FoldedBatchNorm)
    assert [n for n, _ in ready.named_parameters()] == [n for n, _ in model.named_parameters()]
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    with torch.no_grad():
        assert torch.allclose(ready(x), model(x), rtol=1e-12, atol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    want = make_hvp(affine_bns(copy.deepcopy(model)), F.cross_entropy, [(x, y)], names)
    V = torch.randn(want.dim, 2, dtype=torch.float64)
    ref = want(V)
    assert (make_hvp(ready, F.cross_entropy, [(x, y)], names)(V) - ref).norm() <= 1e-10 * ref.norm()


def test_graphs_that_fit_are_kept_from_product_to_product_and_a_broken_first_pass_keeps_none(tiny, monkeypatch):
    model, data, H = tiny
    names = [n for n, _ in model.named_parameters()]
    calls, broken = [], [True]

    def loss(logits, y, reduction="mean"):  # counts the forward passes; the first product breaks at its 2nd chunk
        calls.append(len(y))
        if len(calls) == 4 and broken:  # calls 1-2: image_bytes' one- and two-image graphs
            broken.pop()
            raise RuntimeError("killed")
        return F.cross_entropy(logits, y, reduction=reduction)

    hvp = make_hvp(model, loss, [*data, *data], names, chunk=8)  # four chunks of 8
    assert hvp.keeps
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="killed"):
        hvp(V)
    calls.clear()
    first = hvp(V)
    assert calls == [8, 8, 8, 8]  # built again, whole
    again, one = hvp(V), hvp(V[:, 1])
    assert calls == [8, 8, 8, 8]  # then kept: no more forward passes
    assert torch.equal(again, first) and torch.equal(one, first[:, 1])
    assert torch.allclose(first, H @ V, rtol=1e-4, atol=1e-6)
    per_image = hessian.image_bytes(model, F.cross_entropy, *data[0], [p for p in model.parameters()])
    monkeypatch.setattr(hessian, "KEEP_BYTES", 32 * per_image - 1)  # one byte short of the 32 images' graphs
    calls.clear()
    rebuilt = make_hvp(model, loss, [*data, *data], names, chunk=8)
    assert not rebuilt.keeps
    assert torch.equal(rebuilt(V), first) and torch.equal(rebuilt(V[:, 1]), first[:, 1])
    assert calls == [1, 2] + [8] * 8  # each call builds every chunk's graph again


def test_lanczos_top_k_equals_the_explicit_eigenvalues(tiny):
    model, data, H = tiny
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    hvp = make_hvp(model, F.cross_entropy, data, [n for n, _ in model.named_parameters()])
    lz = lanczos(hvp, hvp.dim, 3, 300, 1e-6, torch.randn(hvp.dim, dtype=torch.float64))
    assert torch.allclose(torch.tensor(lz.ritz, dtype=torch.float64), exact, rtol=1e-4)
    assert all(r <= 1e-6 * abs(t) for r, t in zip(lz.residuals, lz.ritz)) and lz.hvps < 300


def test_lanczos_needs_its_reorthogonalisation():
    # A spectrum with one dominant eigenvalue: without re-orthogonalisation, its ghost copies
    # take the top-k places once the first has converged (Paige).
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    evals = torch.cat(
        [torch.tensor([100.0, 50.0, 49.0], dtype=torch.float64), torch.rand(297, generator=g, dtype=torch.float64) * 10]
    )
    A = q @ torch.diag(evals) @ q.T
    start = torch.randn(300, generator=g, dtype=torch.float64)
    good = lanczos(lambda v: A @ v, 300, 3, 150, 0.0, start)
    assert torch.allclose(
        torch.tensor(good.ritz, dtype=torch.float64), torch.tensor([100.0, 50.0, 49.0], dtype=torch.float64), rtol=1e-8
    )
    bad = lanczos(lambda v: A @ v, 300, 3, 150, 0.0, start, reorthogonalise=False)
    want = torch.tensor([100.0, 50.0, 49.0], dtype=torch.float64)
    assert not torch.allclose(torch.tensor(bad.ritz, dtype=torch.float64), want, rtol=1e-4)


def test_hutchinson_interval_covers_the_exact_trace_in_at_least_90_of_50_seeds(tiny):
    _, _, H = tiny
    exact = float(torch.trace(H))
    covered = stopped_early = 0
    for seed in range(50):
        tr = hutchinson(lambda v: H @ v, H.shape[0], 0.3, 400, torch.Generator().manual_seed(seed))
        covered += tr.lo <= exact <= tr.hi
        stopped_early += tr.samples < 400
    assert covered >= 45, covered
    assert stopped_early > 0  # the stopping rule was exercised


def test_per_stage_traces_sum_to_the_full_trace_within_their_intervals(tiny):
    model, data, H = tiny
    full = hutchinson(lambda v: H @ v, H.shape[0], 0.02, 400, torch.Generator().manual_seed(1))
    offsets, i = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = range(i, i + p.numel())
        i += p.numel()
    parts = []
    for gnames in model.parameter_groups().values():
        idx = torch.tensor([j for n in gnames for j in offsets[n]])
        B = H[idx][:, idx]
        parts.append(hutchinson(lambda v, B=B: B @ v, len(idx), 0.02, 400, torch.Generator().manual_seed(2)))
    total = sum(p.mean for p in parts)
    slack = sum((p.hi - p.lo) / 2 for p in parts) + (full.hi - full.lo) / 2
    assert abs(total - full.mean) <= slack
    assert set(model.parameter_groups()) == {"layer1", "layer2", "layer3", "other"}


def test_slq_density_integrates_to_one(tiny):
    _, _, H = tiny
    g = torch.Generator().manual_seed(0)
    starts = [torch.randint(0, 2, (H.shape[0],), generator=g, dtype=torch.float64) * 2 - 1 for _ in range(3)]
    runs = [lanczos(lambda v: H @ v, H.shape[0], 1, 60, 0.0, z) for z in starts]
    assert all(sum(r.weights) == pytest.approx(1.0, abs=1e-9) for r in runs)
    grid, dens, _ = density(runs)
    assert torch.trapezoid(torch.tensor(dens), torch.tensor(grid)).item() == pytest.approx(1.0, abs=1e-3)
    assert max(grid) >= float(torch.linalg.eigvalsh(H).max()) * 0.99  # the spectrum's edge is found


def test_the_study_end_to_end_and_a_rerun_computes_nothing(two_checkpoints, tmp_path, monkeypatch):
    from resnet_lab.ablation.cli import main as ablate_main
    from resnet_lab.ablation.studies import hessian

    out = tmp_path / "h"
    argv = [two_checkpoints[0], "--out", str(out), "--studies", "hessian", "--hessian-images", "16", "--hessian-top-k",
            "2", "--hessian-per-stage", "on", "--hessian-slq", "2", "--hessian-max-iter", "12", "--hessian-tol", "0.05",
            "--no-progress"]  # fmt: skip
    assert ablate_main(argv) == 0
    rows = [r for r in json.loads((out / "results.json").read_text()) if r["study"] == "hessian"]
    groups = {r["group"] for r in rows}
    assert groups == {"all", "layer1", "layer2", "layer3", "other"}
    top = [r for r in rows if r["quantity"] == "eigenvalue" and r["group"] == "all"]
    assert [r["rank"] for r in top] == [1, 2] and top[0]["value"] >= top[1]["value"] and top[0]["images"] == 16
    (dens,) = [r for r in rows if r["quantity"] == "density"]
    assert dens["runs"] == 2 and (out / "hessian_density.png").exists()
    assert "Curvature" in (out / "report.md").read_text()
    before = (out / "results.jsonl").read_text()

    def boom(*a, **k):
        raise AssertionError("a rerun computed a Hessian-vector product")

    monkeypatch.setattr(hessian, "make_hvp", boom)
    assert ablate_main(argv) == 0
    assert (out / "results.jsonl").read_text() == before


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--hessian-top-k", "5", "--hessian-max-iter", "3"], "exceeds --hessian-max-iter"),
        (["--hessian-top-k", "10000000", "--hessian-max-iter", "10000000"], "weights of resnet14"),
        (["--hessian-tol", "0"], "> 0"),
        (["--hessian-tol", "nan"], "finite"),
        (["--hessian-tol", "1"], "below 1"),  # a relative accuracy of 100% asks for nothing
        (["--hessian-tol", "1.5"], "below 1"),
        (["--hessian-images", "0"], "hessian-images"),
        (["--hessian-slq", "0"], "hessian-slq"),
    ],
)
def test_bad_hessian_options_are_one_line_and_write_nothing(two_checkpoints, tmp_path, capsys, flags, words):
    out = tmp_path / "bad"
    assert_refused([two_checkpoints[0], "--out", str(out), "--studies", "hessian", *flags], capsys, words)
    assert not out.exists()


def test_per_stage_on_a_net_without_stages_is_refused():
    from resnet_lab.ablation.studies import StudyOptions
    from resnet_lab.ablation.studies.hessian import Hessian
    from resnet_lab.ablation.study import AblationError, common_of

    opts = StudyOptions(studies=("hessian",), hessian_per_stage="on")
    one_layer = build(ViTSpec(depth=1, image_size=32, patch_size=8, width=16, heads=2, mlp_dim=32))
    with pytest.raises(AblationError, match="no stages"):
        Hessian().check_model(one_layer, Hessian().options(opts), common_of(opts))
    Hessian().check_model(trained_like("resnet8"), Hessian().options(opts), common_of(opts))  # three stages


def test_parameter_groups_of_every_family_partition_its_weights_by_stage_or_layer():
    vit = build(ViTSpec(depth=3, image_size=32, patch_size=8, width=16, heads=2, mlp_dim=32))
    cnx = build(ConvNeXtSpec(stage_depths=(1, 2, 1, 1), widths=(4, 8, 8, 12)))
    res = trained_like("resnet8")
    for model, stages in ((vit, ["layer0", "layer1", "layer2"]), (cnx, ["stage1", "stage2", "stage3", "stage4"]),
                          (res, ["layer1", "layer2", "layer3"])):  # fmt: skip
        groups = model.parameter_groups()
        assert sorted(groups) == sorted([*stages, "other"])
        names = [n for g in groups.values() for n in g]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each weight once
        for stage in stages:  # a group is exactly the parameters of its units
            units = [b for b in model.block_names if b.rsplit(".", 1)[0] == stage]
            want = {id(p) for u in units for p in model.get_block(u).parameters()}
            params = dict(model.named_parameters())
            assert {id(params[n]) for n in groups[stage]} == want
    assert any(n.startswith("encoder.layers.encoder_layer_1.") for n in vit.parameter_groups()["layer1"])
    assert "class_token" in vit.parameter_groups()["other"]
    assert any(n.startswith("features.2.") for n in cnx.parameter_groups()["other"])  # downsampling: not a stage


@pytest.mark.slow
def test_the_geometry_benchmark_counts_products_on_a_stand_in_and_on_a_checkpoint(two_checkpoints):
    """scripts/bench_geometry.py hessian: both ways to a net run, and its figures hang together."""
    import subprocess
    import sys

    from .conftest import REPO

    def bench(*args):
        argv = [sys.executable, "bench_geometry.py", "hessian", "--images", "16", "--rounds", "1", "--max-iter", "40"]
        r = subprocess.run([*argv, *args], cwd=REPO / "scripts", capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]

    (stand_in,) = bench("--models", "resnet8")
    (trained,) = bench("--checkpoints", two_checkpoints[0])
    for res in (stand_in, trained):
        assert 1 <= res["lanczos_products_to_tol"] <= res["power_ran"] and res["weights"] > 1000
        assert res["seconds_per_product_in_a_block"] > 0 and res["product_over_forward_backward"] > 1
    assert trained["model"].startswith("resnet14 (")  # the checkpoint's own net and label
