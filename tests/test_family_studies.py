"""Every study on ViTs and ConvNeXts, against naive references (the lesion engine itself is
checked against torchvision's nets in test_families.py)."""

import csv
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from resnet_lab.ablation import paths
from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.studies.influence import per_image
from resnet_lab.ablation.studies.iterative import block_steps
from resnet_lab.ablation.studies.probes import pooled_features
from resnet_lab.models import build, resolve_spec

from .conftest import trained_like
from .test_representations import naive_steps
from .test_studies import write_checkpoint

TINY = {
    "vit": dict(depth=2, image_size=16, patch_size=4, width=16, heads=2, mlp_dim=32),
    "convnext": dict(stage_depths=(1, 2, 2, 1), widths=(4, 8, 8, 12), layer_scale=0.5),
}


def tiny(family, **kw):
    torch.manual_seed(0)
    m = build(resolve_spec(f"cifar_{family}").replace(**{**TINY[family], **kw}))
    with torch.no_grad():  # weights of order 1, so every unit moves the stream
        for p in m.parameters():
            p.mul_(4) if p.ndim > 1 else p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def data(b=3, size=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, size, size, generator=g, dtype=dtype), torch.tensor([1, 4, 7][:b])


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_sum_over_all_routings_is_the_input_gradient_and_each_routing_a_separate_backward(family):
    m = tiny(family).double()
    x, y = data(dtype=torch.double)
    n = len(m.block_names)
    routes = torch.tensor(list(itertools.product([False, True], repeat=n)))
    _, grads = paths.routed_input_grads(m, x, y, routes)
    h0 = m.forward_stem(x).detach().requires_grad_()
    F.cross_entropy(m.forward_from(h0, 0), y, reduction="sum").backward()
    torch.testing.assert_close(grads.sum(0), h0.grad, rtol=1e-9, atol=1e-12)
    assert h0.grad.abs().max() > 1e-4
    for r in random.Random(0).sample(range(len(routes)), 4):  # naive: the unrouted path detached
        h = g0 = m.forward_stem(x).detach().requires_grad_()
        for pos, (blk, through) in enumerate(zip(m.blocks, routes[r].tolist())):
            b, s = blk.branch(h), blk.shortcut(h)
            h = m.after(pos, blk.merge(b, s.detach()) if through else blk.merge(b.detach(), s))
        F.cross_entropy(m.forward_head(h), y, reduction="sum").backward()
        torch.testing.assert_close(grads[r], g0.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family, kw", [("vit", {}), ("vit", {"plain": True}), ("convnext", {}),
                                        ("convnext", {"plain": True, "layer_scale": 1.0})])  # fmt: skip
def test_iterative_equals_one_forward_and_backward_per_unit(family, kw):
    m = tiny(family, **kw)
    x, y = data()
    steps = block_steps(m, x, y)
    for i, s in enumerate(steps):
        cos, ratio = naive_steps(m, x, y, i)
        torch.testing.assert_close(s["cos"], cos, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s["ratio"], ratio, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_probe_features_are_each_units_pooled_output(family):
    m = tiny(family)
    x, y = data(5)
    feats, _ = pooled_features(m, [(x[:2], y[:2]), (x[2:], y[2:])])
    with torch.no_grad():
        for i, b in enumerate(m.block_names):
            h = m.forward_until(x, i + 1)  # its output (after a stage's downsampling layer)
            want = h.mean(1) if family == "vit" else h.mean((2, 3))
            torch.testing.assert_close(feats[b], want.double(), rtol=1e-5, atol=1e-6)


def test_block_influence_equals_hooks_on_each_unit():
    """ResNet blocks (a downsampling one compared through its shortcut) by forward hooks; ViT
    updates by the stream before and after each of them."""
    res = trained_like("resnet14")
    x, _ = data(4, 32)
    got = {n: (1 - F.cosine_similarity(s.double(), o.double(), dim=1)).flatten(1).mean(1) for n, s, o in res.unit_io(x)}
    seen = {}
    hooks = [
        res.get_block(n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (mod.shortcut(i[0]), o)))
        for n in res.block_names
    ]
    with torch.no_grad():
        res(x)
    for h in hooks:
        h.remove()
    for n, (s, o) in seen.items():
        cos = torch.stack([F.cosine_similarity(s[:, :, i, j].double(), o[:, :, i, j].double(), dim=1)
                           for i in range(s.shape[2]) for j in range(s.shape[3])], 1)  # fmt: skip
        torch.testing.assert_close(got[n], (1 - cos).mean(1))
    vit = tiny("vit")
    xv, _ = data(4)
    with torch.no_grad():
        h = vit.forward_stem(xv)
        for blk in vit.blocks:
            out = h + blk.residual(h)
            want = torch.stack([1 - F.cosine_similarity(h[:, t].double(), out[:, t].double(), dim=1)
                                for t in range(h.shape[1])], 1).mean(1)  # fmt: skip
            torch.testing.assert_close(per_image(h, out), want)
            h = out
    # A removed unit does not turn the stream at all.
    with vit.remove_blocks(["layer1"]):
        io = {n: per_image(s, o) for n, s, o in vit.unit_io(xv)}
    assert float(io["layer1.attn"].abs().max()) < 1e-12 and float(io["layer0.mlp"].min()) > 1e-3


def write(tmp_path, family, plain=False):
    m = tiny(family, image_size=32) if family == "vit" else tiny(family)
    if plain:
        m = tiny(family, plain=True, **({"image_size": 32} if family == "vit" else {"layer_scale": 1.0}))
    data_hp = {"source": "synthetic", "val_size": 200, "eval_subset": None, "batch_size": 32}
    path = tmp_path / f"{family}{'_plain' if plain else ''}.ckpt"
    state = {f"net.{k}": v for k, v in m.state_dict().items()}
    torch.save({"hyper_parameters": {"spec": m.spec.to_dict()}, "state_dict": state,
                "datamodule_hyper_parameters": data_hp, "global_step": 0}, path)  # fmt: skip
    return str(path), m


def test_every_study_runs_on_both_families_and_agrees_with_a_plain_evaluation(tmp_path):
    (vit, vm), (cnx, cm), (plain, pm) = (
        write(tmp_path, "vit"),
        write(tmp_path, "convnext"),
        write(tmp_path, "vit", True),
    )
    out = tmp_path / "rep"
    args = ["--studies", "single", "k", "adjacent", "reorder", "responses", "influence", "paths", "iterative",
            "probes", "cka", "landscape", "hessian", "shattered", "--limit", "48", "--samples", "2", "--k-max", "2",
            "--paths-images", "4", "--probe-images", "100", "--landscape-grid", "3", "--landscape-directions", "1",
            "--landscape-images", "16", "--hessian-images", "16", "--hessian-top-k", "1", "--hessian-max-iter", "10",
            "--hessian-tol", "0.5", "--hessian-per-stage", "on", "--shattered-lines", "1", "--shattered-points", "8",
            "--no-progress"]  # fmt: skip
    assert ablate_main([vit, cnx, plain, "--out", str(out), *args]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    studies = {(r["checkpoint"].split(" ")[0], r["study"]) for r in rows}
    for name in (vm.spec.name, cm.spec.name):
        assert {s for n, s in studies if n == name} >= {"single", "k", "adjacent", "reorder", "responses",
                                                         "influence", "paths", "iterative", "probes", "cka",
                                                         "landscape", "hessian", "shattered"}  # fmt: skip
    for name, groups in ((vm.spec.name, {"layer0", "layer1"}), (cm.spec.name, {f"stage{s}" for s in range(1, 5)})):
        traces = {r["key"] for r in rows if r["study"] == "hessian" and r["checkpoint"].startswith(name)}
        assert {f"{g} trace" for g in [*groups, "all", "other"]} <= traces  # per stage (ConvNeXt) or layer (ViT)
    plain_paths = [r for r in rows if r["study"] == "paths" and r["checkpoint"].startswith(pm.spec.name)]
    assert [r["applicable"] for r in plain_paths] == ["False"]  # a plain net has one path
    # The intact error is the checkpoint's own error on the same 48 test images.
    from resnet_lab.data.cifar import CIFAR10DataModule

    dm = CIFAR10DataModule(source="synthetic", val_size=200, batch_size=48)
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    x = dm.normalize(x)
    for name, m in ((vm.spec.name, vm), (cm.spec.name, cm)):
        intact = next(
            r for r in rows if r["study"] == "single" and r["key"] == "intact" and r["checkpoint"].startswith(name)
        )
        with torch.no_grad():
            want = 100 * float((m(x[:48]).argmax(1) != y[:48]).double().mean())
        assert float(intact["error"]) == pytest.approx(want)
    md = (out / "report.md").read_text()
    assert "y = x (ViT and ConvNeXt units)" in md or "y = x:" in md
    assert "Block influence" in md


def test_removing_a_layer_that_is_not_a_unit_is_one_line(tmp_path, capsys):
    cnx, _ = write(tmp_path, "convnext")
    out = tmp_path / "rep"
    assert ablate_main([cnx, "--blocks", "features.2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown block name(s) ['features.2']" in err and "downsampling layers between stages" in err
    assert err.count("\n") == 1 and not out.exists()


def test_the_single_table_lists_the_blocks_of_every_checkpoint():
    """The table took its rows from the first checkpoint: beside a ResNet, a ViT's units (or a
    deeper ResNet's extra blocks) were silently left out."""
    from resnet_lab.ablation.studies.single import table

    def row(ck, block, pos, err):
        return {"study": "single", "checkpoint": ck, "condition": "eval-bn", "key": f"drop:{block}", "block": block,
                "position": pos, "downsample": False, "removed_as": "identity", "error": err}  # fmt: skip

    rows = [row("a", "layer1.0", 0, 10.0), row("b", "layer0.attn", 0, 20.0), row("b", "layer0.mlp", 1, 30.0)]
    rows += [{"study": "single", "checkpoint": c, "condition": "eval-bn", "key": "intact", "error": 5.0} for c in "ab"]
    head, body = table(rows)
    assert head == ["condition", "a", "b"]
    assert [b[0] for b in body] == ["intact (baseline)", "drop layer1.0", "drop layer0.attn", "drop layer0.mlp"]
    assert body[3] == ["drop layer0.mlp", "-", "30.00"]


def test_the_iterative_table_names_each_positions_blocks_of_every_checkpoint():
    """The block column showed the last checkpoint's name at each position: beside a ConvNeXt,
    a ResNet's layer1.0 was labelled stage1.0."""
    from resnet_lab.ablation.studies.iterative import Iterative

    def row(ck, block, pos):
        return {"study": "iterative", "checkpoint": ck, "block": block, "position": pos, "applicable": True,
                "downsample": False, "cos_mean": -0.1, "cos_std": 0.0, "ratio_mean": 1.0, "ratio_std": 0.0}  # fmt: skip

    rows = [row("a", "layer1.0", 0), row("b", "stage1.0", 0), row("a", "layer1.1", 1), row("b", "layer1.1", 1)]
    (sec,) = Iterative().sections(rows, {})
    assert [r[1] for r in sec.table[1]] == ["layer1.0 / stage1.0", "layer1.1"]


def test_the_probe_table_names_each_positions_blocks_of_every_checkpoint():
    from resnet_lab.ablation.studies.probes import Probes

    def row(ck, block, pos):
        return {"study": "probes", "checkpoint": ck, "block": block, "position": pos, "downsample": False,
                "error": 50.0, "error_ci_lo": 40.0, "error_ci_hi": 60.0, "l2": 0.01, "train_images": 100,
                "n": 10}  # fmt: skip

    rows = [row("a", "stem", -1), row("b", "stem", -1), row("a", "layer1.0", 0), row("b", "layer0.attn", 0)]
    (sec,) = Probes().sections(rows, {})
    assert [r[1] for r in sec.table[1]] == ["stem", "layer1.0 / layer0.attn"]


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_responses_are_each_units_branch_std_at_its_input(family):
    m = tiny(family)
    x, _ = data(4)
    stds = m.response_stds(x)
    assert list(stds) == m.block_names
    with torch.no_grad():
        for i, b in enumerate(m.block_names):  # naive: a forward to the unit's input, then its branch alone
            want = m.get_block(b).residual(m.forward_until(x, i)).std().item()
            assert stds[b] == pytest.approx(want, rel=1e-5)


def test_convnext_differences_compare_depths_and_the_plain_twin():
    """net_differences grouped depth families on the spec without `depth` (a ConvNeXt's is
    `stage_depths`) and twins on the spec without `plain` (a plain ConvNeXt must also change its
    layer scale and drop path): no ConvNeXt comparison was ever made."""
    from resnet_lab.ablation.stats import net_differences

    def spec(**kw):
        return resolve_spec("cifar_convnext").replace(drop_path=0.1, **kw).to_dict()

    plain = resolve_spec("plain_cifar_convnext_atto").to_dict()
    nets = {"deep": spec(), "shallow": spec(stage_depths=(1, 1, 3, 1)), "plain": plain}
    checkpoints = [{"label": f"{n}{s}", "spec": sp} for n, sp in nets.items() for s in "ab"]
    values = {"deepa": 1.0, "deepb": 2.0, "shallowa": 3.0, "shallowb": 5.0, "plaina": 8.0, "plainb": 9.0}
    diffs = dict(net_differences(values, checkpoints))
    deep = diffs["cifar_convnext_atto_dp0.1 − convnext_cifar_d1-1-3-1_w40-80-160-320_dp0.1"]
    assert deep.mean == pytest.approx(1.5 - 4.0)
    twin = diffs["plain_cifar_convnext_atto − cifar_convnext_atto_dp0.1"]
    assert twin.mean == pytest.approx(8.5 - 1.5)


def test_nets_without_batchnorm_get_no_recalibrated_rows_and_the_report_does_not_claim_bn(tmp_path, capsys):
    """A ViT or ConvNeXt has no BatchNorm: nothing to re-estimate. Beside a ResNet, --bn-recalib
    gives recalibrated-bn rows to the ResNet alone and says so; the report does not describe
    BN statistics the nets do not have. Alone, the option would do nothing: refused."""
    (vit, _), (cnx, _) = write(tmp_path, "vit"), write(tmp_path, "convnext")
    res = write_checkpoint(tmp_path / "resnet8" / "net.ckpt", "resnet8")
    out = tmp_path / "mixed"
    argv = ["--studies", "single", "--limit", "32", "--bn-recalib", "16", "--no-progress"]
    assert ablate_main([res, vit, "--out", str(out), *argv]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    recal = {r["checkpoint"].split(" ")[0] for r in rows if r["condition"] == "recalibrated-bn"}
    assert recal == {"resnet8"} and {r["checkpoint"].split(" ")[0] for r in rows} == {
        "resnet8",
        "vit2_i32_p4_w16_h2_m32",
    }
    md = (out / "report.md").read_text()
    assert "BN (in 1 of 2 nets; vit2_i32_p4_w16_h2_m32 has none): trained running statistics (eval mode)." in md
    assert (
        "'recalibrated-bn' rows re-estimate BN on 16 training images (not for vit2_i32_p4_w16_h2_m32: no BatchNorm)."
        in md
    )
    for argv_alone, words in (
        ([vit, cnx, *argv], "--bn-recalib 16: none of these nets has BatchNorm"),
        ([vit, "--studies", "landscape", "--landscape-bn", "recalibrated", "--no-progress"],
         "--landscape-bn recalibrated: none of these nets has BatchNorm"),
    ):  # fmt: skip
        assert ablate_main([*argv_alone, "--out", str(tmp_path / "alone")]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and not (tmp_path / "alone").exists(), err
    out = tmp_path / "vit"
    assert ablate_main([vit, "--out", str(out), "--studies", "single", "--limit", "32", "--no-progress"]) == 0
    assert "No BatchNorm in these nets." in (out / "report.md").read_text()
