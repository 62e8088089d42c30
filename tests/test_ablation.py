"""Lesion engine and `resnet-lab ablate`: equivalences, reproducibility, resume, report, bad input."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from resnet_lab.ablation import engine
from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.engine import Condition
from resnet_lab.models import create_model

from .conftest import naive_logits, trained_like
from .wandb_offline import read_offline_run


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet18"])
def test_prefix_shared_equals_naive(name):
    m = trained_like(name, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    conds = engine.single_block_conditions(m)
    conds += engine.k_conditions(m, 3, 5, seed=0)
    if m.swappable_groups():
        conds += engine.reorder_conditions(m, 2, 3, seed=0)
    fast = engine.condition_logits(m, x, conds)
    assert set(fast) == {c.key for c in conds}
    for c in conds:
        torch.testing.assert_close(fast[c.key], naive_logits(m, x, c), rtol=1e-5, atol=1e-5)
    # A lesion actually changes something (the comparison is not vacuous).
    assert not torch.allclose(fast["drop:layer2.1"], fast["intact"])


def test_removing_nothing_equals_intact():
    m = trained_like()
    x = torch.randn(4, 3, 32, 32)
    out = engine.condition_logits(m, x, [Condition("none"), Condition("same", order=tuple(m.block_names))])
    torch.testing.assert_close(out["none"], m(x), rtol=0, atol=0)
    torch.testing.assert_close(out["same"], m(x), rtol=0, atol=0)


def test_k_subsets_reproducible_from_seed():
    blocks = [f"b{i}" for i in range(27)]
    a = engine.k_subsets(blocks, 4, 20, seed=7)
    assert a == engine.k_subsets(blocks, 4, 20, seed=7)
    assert a != engine.k_subsets(blocks, 4, 20, seed=8)
    assert len(set(a)) == 20 and all(len(s) == 4 and len(set(s)) == 4 for s in a)
    assert engine.k_subsets(blocks, 1, 100, 0) == [(b,) for b in blocks]  # fewer than asked: all
    with pytest.raises(ValueError, match="between 1 and the 27"):
        engine.k_subsets(blocks, 28, 5, 0)


def test_kendall_tau():
    ref = list("abcde")
    assert engine.kendall_tau(ref, ref) == 1.0
    assert engine.kendall_tau(ref[::-1], ref) == -1.0
    assert engine.kendall_tau(list("bacde"), ref) == pytest.approx(1 - 2 * 1 / 10)
    # Against a brute-force count on random permutations.
    rng = random.Random(0)
    for _ in range(20):
        perm = ref[:]
        rng.shuffle(perm)
        pos = {b: i for i, b in enumerate(perm)}
        conc = sum(1 for i in range(5) for j in range(i + 1, 5) if pos[ref[i]] < pos[ref[j]])
        assert engine.kendall_tau(perm, ref) == pytest.approx((conc - (10 - conc)) / 10)
    m = create_model("resnet56")
    order = engine.random_reorder(m, 5, random.Random(0))
    with m.reorder_blocks(order):  # shape-compatible by construction
        pass


ARGS = [
    "--studies",
    "single",
    "k",
    "reorder",
    "responses",
    "--k-max",
    "2",
    "--samples",
    "3",
    "--limit",
    "300",
    "--batch-size",
    "100",
    "--no-progress",
]


@pytest.mark.slow
def test_ablate_report_and_resume(two_checkpoints, tmp_path):
    out = tmp_path / "rep"
    assert ablate_main([*two_checkpoints, "--out", str(out), *ARGS]) == 0
    for f in (
        "results.csv",
        "results.json",
        "report.md",
        "report.html",
        "single_block.png",
        "k_lesion.png",
        "reorder.png",
        "responses.png",
        "manifest.json",
    ):
        assert (out / f).exists(), f
    rows = json.loads((out / "results.json").read_text())
    csv_text = (out / "results.csv").read_text()
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    single = [r for r in rows if r["study"] == "single" and r["checkpoint"].startswith("resnet14")]
    assert len(single) == 1 + 6  # intact + 6 blocks
    for r in single:
        assert f"{r['error']:.2f}" in md and f"{r['error']:.2f}" in page
        assert repr(r["error"]) in csv_text or str(r["error"]) in csv_text
    assert "data:image/png;base64," in page and "resnet-lab ablate" in page
    assert {r["k"] for r in rows if r["study"] == "k"} == {1, 2}

    # Interrupted run: keep the first two units only, then rerun: same final results.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # a torn last line
    assert ablate_main([*two_checkpoints, "--out", str(out), *ARGS]) == 0
    assert json.loads((out / "results.json").read_text()) == rows


@pytest.mark.slow
def test_ablate_logs_table_to_wandb_offline(two_checkpoints, tmp_path):
    out = tmp_path / "rep"
    assert (
        ablate_main(
            [*two_checkpoints, "--out", str(out), "--studies", "single", "--limit", "100", "--no-progress", "--wandb"]
        )
        == 0
    )
    run = read_offline_run(out)
    logged = {k for row in run["history"] for k in row}
    assert {"ablation/results/_type", "ablation/single/_type"} <= logged
    assert "ablation" in run["tags"] and run["group"] == "ablation"
    (table,) = list(out.rglob("ablation/results_*.table.json"))
    data = json.loads(table.read_text())
    rows = json.loads((out / "results.json").read_text())
    assert len(data["data"]) == len(rows)
    err = data["columns"].index("error")
    assert sorted(r[err] for r in data["data"]) == sorted(r["error"] for r in rows)


def test_bad_inputs(two_checkpoints, tmp_path, capsys):
    res, plain = two_checkpoints
    junk = tmp_path / "junk.ckpt"
    torch.save({"state_dict": {}}, junk)
    assert ablate_main([str(junk), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "not a resnet-lab checkpoint" in capsys.readouterr().err
    assert ablate_main([res, "--out", str(tmp_path / "b"), "--k-max", "7", "--studies", "k", "--no-progress"]) == 2
    assert "exceeds the 6 removable blocks" in capsys.readouterr().err
    # Unknown block names.
    assert ablate_main([res, "--out", str(tmp_path / "u"), "--blocks", "layer1.0", "layer9.9", "--no-progress"]) == 2
    assert "unknown block name(s) ['layer9.9']" in capsys.readouterr().err
    # Trained on different datasets: same spec, another data source in the run's config.
    other_run = tmp_path / "other_run"
    shutil.copytree(Path(res).parent.parent, other_run, ignore=shutil.ignore_patterns("wandb", "csv"))
    cfg = yaml.safe_load((other_run / "config.yaml").read_text())
    cfg["data"]["init_args"]["source"] = "folder"
    cfg["data"]["init_args"]["folder"] = "/data/other"
    (other_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert (
        ablate_main([res, str(other_run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "ds"), "--no-progress"])
        == 2
    )
    assert "trained on different datasets" in capsys.readouterr().err
    # Different class counts.
    other = tmp_path / "other.ckpt"
    ck = torch.load(plain, weights_only=False)
    ck["hyper_parameters"]["spec"]["num_classes"] = 5
    ck["state_dict"]["net.fc.weight"] = ck["state_dict"]["net.fc.weight"][:5]
    ck["state_dict"]["net.fc.bias"] = ck["state_dict"]["net.fc.bias"][:5]
    torch.save(ck, other)
    assert ablate_main([res, str(other), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "10 classes but" in capsys.readouterr().err
    # An output directory holding another configuration's report.
    out = tmp_path / "d"
    assert ablate_main([res, "--out", str(out), "--studies", "single", "--limit", "100", "--no-progress"]) == 0
    assert ablate_main([res, "--out", str(out), "--studies", "single", "--limit", "200", "--no-progress"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert (
        ablate_main([res, "--out", str(out), "--studies", "single", "--limit", "200", "--no-progress", "--overwrite"])
        == 0
    )
    assert all(r["n"] == 200 for r in json.loads((out / "results.json").read_text()))


def test_unknown_block_name_in_condition():
    m = create_model("resnet20")
    with pytest.raises(KeyError, match="unknown block name"):
        engine.condition_logits(m, torch.randn(1, 3, 32, 32), [Condition("x", removed=("layer9.9",))])


def test_bn_recalibration_is_a_separate_condition(two_checkpoints, tmp_path):
    out = tmp_path / "bn"
    argv = [
        two_checkpoints[0],
        "--out",
        str(out),
        "--studies",
        "single",
        "--limit",
        "100",
        "--bn-recalib",
        "64",
        "--no-progress",
    ]
    assert ablate_main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    evalbn = {r["key"]: r for r in rows if r["condition"] == "eval-bn"}
    recal = {r["key"]: r for r in rows if r["condition"] == "recalibrated-bn"}
    assert set(recal) == set(evalbn) - {"intact"}  # one recalibrated row per removed block
    assert any(recal[k]["loss"] != evalbn[k]["loss"] for k in recal)  # it changes the statistics
    md = (out / "report.md").read_text()
    assert "recalibrated-bn" in md and "re-estimate BN on 64 training images" in md


def test_recalibrate_bn_matches_batch_statistics():
    m = trained_like("resnet20")
    bn = m.get_block("layer3.2").bn2
    seen = []
    h = bn.register_forward_hook(lambda mod, i, o: seen.append(i[0].detach().clone()))
    x1, x2 = torch.randn(32, 3, 32, 32), torch.randn(32, 3, 32, 32)
    early = m.get_block("layer1.0").bn1.running_mean.clone()
    engine.recalibrate_bn(m, [(x1, None), (x2, None)], from_position=3)
    h.remove()
    assert not m.training
    # Cumulative average over the two batches (momentum=None) of what the BN saw.
    want = torch.stack([s.mean((0, 2, 3)) for s in seen]).mean(0)
    torch.testing.assert_close(bn.running_mean, want, rtol=1e-4, atol=1e-5)
    # BNs before the first changed block keep their trained statistics.
    assert torch.equal(m.get_block("layer1.0").bn1.running_mean, early)


def test_recalibrate_bn_includes_a_preact_nets_final_bn():
    m = trained_like("preact_resnet20")
    seen = []
    h = m.final_bn.register_forward_hook(lambda mod, i, o: seen.append(i[0].detach().clone()))
    x = torch.randn(32, 3, 32, 32)
    early = m.get_block("layer1.0").bn1.running_mean.clone()
    with m.remove_blocks(["layer3.1"]):  # final_bn sees another input after a removal
        engine.recalibrate_bn(m, [(x, None)], from_position=m.block_names.index("layer3.1"))
    h.remove()
    torch.testing.assert_close(m.final_bn.running_mean, seen[0].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.equal(m.get_block("layer1.0").bn1.running_mean, early)


def test_a_report_grows_by_added_checkpoints_and_keeps_what_it_has(two_checkpoints, tmp_path, capsys):
    a, b = two_checkpoints
    out, fresh = tmp_path / "grown", tmp_path / "fresh"
    common = ["--studies", "single", "cka", "--limit", "40", "--no-progress"]
    assert ablate_main([a, "--out", str(out), *common]) == 0
    first = (out / "results.jsonl").read_text()
    assert ablate_main([a, b, "--out", str(out), *common]) == 0
    assert "1 checkpoint(s) added to the report" in capsys.readouterr().err
    grown = (out / "results.jsonl").read_text()
    assert grown.startswith(first)  # a's units kept, none recomputed
    old_units = {json.loads(line)["unit"] for line in first.splitlines()}
    new_units = [json.loads(line)["unit"] for line in grown[len(first) :].splitlines()]
    assert new_units and not old_units & set(new_units)
    assert sum("|vs " in u for u in new_units) == 1  # b against a, once
    # The grown report is the report of the two from scratch.
    assert ablate_main([a, b, "--out", str(fresh), *common]) == 0
    rows = [sorted(json.dumps(r, sort_keys=True) for r in json.loads((d / "results.json").read_text()))
            for d in (out, fresh)]  # fmt: skip
    assert rows[0] == rows[1]
    # Anything but a growth is another configuration: fewer, reordered, or other options.
    for argv in ([a], [b, a], [a, b, "--seed", "1"]):
        assert ablate_main([*argv, "--out", str(out), *common]) == 2
        assert "different configuration" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == grown
    # A twin of a's run elsewhere (same run name) relabels a, "<folder/file>": its rows' key changes.
    twin = tmp_path / "elsewhere" / Path(a).parent.parent.name
    shutil.copytree(Path(a).parent.parent, twin)
    assert ablate_main([a, b, str(twin / "checkpoints" / Path(a).name), "--out", str(out), *common]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_a_report_never_resumes_on_other_data(two_checkpoints, tmp_path, capsys):
    out = str(tmp_path / "rep")
    base = [two_checkpoints[0], "--out", out, "--studies", "single", "--limit", "20", "--no-progress"]
    assert ablate_main([*base, "--data-folder", str(tmp_path / "a")]) == 0
    # The same command on another data folder would mix two datasets' rows in one report.
    assert ablate_main([*base, "--data-folder", str(tmp_path / "b")]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_single_block_plot_never_mislabels_blocks():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from resnet_lab.ablation.studies.single import by_net, plot_single

    def rows(ck, names, positions):
        return [{"checkpoint": ck, "condition": "eval-bn", "study": "single", "key": f"drop:{b}", "block": b,
                 "position": p, "downsample": False, "error": 50.0} for b, p in zip(names, positions)]  # fmt: skip

    for rs, want in [
        (rows("a", ["layer1.1", "layer3.2"], [1, 8]), {1: "layer1.1", 8: "layer3.2"}),  # --blocks subset
        (rows("a", ["layer1.0", "layer2.0"], [0, 3]) + rows("b", ["layer1.0", "layer1.3"], [0, 3]), {}),  # 2 depths
    ]:
        fig, ax = plt.subplots()
        plot_single(ax, by_net(rs), {}, {"a": "C0", "b": "C1"}, 10)
        ticks = zip(ax.get_xticks(), ax.get_xticklabels())
        got = {int(t): lab.get_text() for t, lab in ticks if lab.get_text().startswith("layer")}
        plt.close(fig)
        assert got == want


def test_every_checkpoint_of_a_report_has_its_own_colour():
    # Matplotlib's default cycle has 10 colours: the 12 nets of the seeded study drew
    # resnet20 seed 0 and resnet56 seed 2 in the same blue.
    from matplotlib.colors import to_rgba

    from resnet_lab.ablation.report import checkpoint_colours

    for n in (2, 10, 12, 20, 30):
        colours = checkpoint_colours([f"net {i}" for i in range(n)])
        assert len({to_rgba(c) for c in colours.values()}) == n


def test_report_html_renders_code_spans_and_is_titled_by_its_studies(two_checkpoints, tmp_path):
    # Issue 26 §D: report.html showed raw backticks, and read "Test-time lesion report" for CKA alone.
    import re

    out = tmp_path / "r"
    assert ablate_main([two_checkpoints[0], "--out", str(out), "--studies", "iterative", "--limit", "50",
                        "--no-progress"]) == 0  # fmt: skip
    page = (out / "report.html").read_text()
    text = re.sub(r'src="data:[^"]*"', "", page)
    assert "`" not in text and "**" not in text
    assert "<code>results.csv</code>" in text and "<code>resnet-lab ablate " in text
    title = re.search(r"<title>(.*)</title>", page)[1]
    assert "lesion" not in title.lower() and "iterative" in title
    md = (out / "report.md").read_text()
    assert md.startswith(f"# {title}") and "`results.csv`" in md  # Markdown keeps its own syntax


def test_wandb_summary_keeps_each_checkpoint_of_one_architecture(two_checkpoints, tmp_path):
    # Two seeds of one net: the summary was keyed by the net's name, so the second seed's values
    # overwrote the first's under "resnet14/intact_error", a number of one checkpoint named as the net's.
    res = two_checkpoints[0]
    other = tmp_path / "seed1" / "last.ckpt"
    other.parent.mkdir()
    ck = torch.load(res, weights_only=False)
    g = torch.Generator().manual_seed(1)
    ck["state_dict"] = {k: v + 0.3 * torch.randn(v.shape, generator=g) if k.endswith("conv2.weight") else v
                        for k, v in ck["state_dict"].items()}  # fmt: skip
    torch.save(ck, other)
    out = tmp_path / "rep"
    argv = [res, str(other), "--out", str(out), "--studies", "single", "--limit", "100", "--no-progress", "--wandb"]
    assert ablate_main(argv) == 0
    summary = read_offline_run(out)["summary"]
    rows = json.loads((out / "results.json").read_text())
    intact = {r["checkpoint"]: r["error"] for r in rows if r["key"] == "intact" and r["condition"] == "eval-bn"}
    assert len(set(intact.values())) == 2  # the two seeds differ
    for label, error in intact.items():
        assert summary[f"{label}/lesion/intact_error"] == pytest.approx(error)
    pooled = [k for k in summary if k.startswith("resnet14, shortcut A/") and k.endswith("intact_error")]
    assert pooled, sorted(summary)
    (mean_key,) = [k for k in pooled if "mean" in k]
    assert summary[mean_key] == pytest.approx(sum(intact.values()) / 2) and "n = 2" in mean_key
