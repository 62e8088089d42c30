"""Intervals on differences: Welch t intervals and their verdicts, the sweep summary's depth
comparisons, and ablate's lesion robustness deep vs shallow, all on known numbers."""

import csv
import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from scipy.stats import ttest_ind

from resnet_lab.ablation.stats import differences_table, welch
from resnet_lab.models import ResNetSpec
from resnet_lab.sweep.summary import depth_comparisons, summarize, trial_rows


def test_welch_interval_on_known_numbers():
    d = welch([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    # By hand: difference 6 - 2 = 4; s²/n = 1/3 and 4/3, se² = 5/3; Welch df = (5/3)² / ((1/3)²/2 + (4/3)²/2)
    # = 50/17 (< 3, so t(0.975) = 3.2188 > t(0.975, 3) = 3.1824); half-width 3.2188 * sqrt(5/3) = 4.1554.
    assert d.mean == 4.0 and (d.n_a, d.n_b) == (3, 3)
    assert d.df == pytest.approx(50 / 17)
    assert d.lo == pytest.approx(4 - 4.1554, abs=1e-3) and d.hi == pytest.approx(4 + 4.1554, abs=1e-3)
    ref = ttest_ind([4.0, 6.0, 8.0], [1.0, 2.0, 3.0], equal_var=False).confidence_interval()
    assert (d.lo, d.hi) == pytest.approx((ref.low, ref.high))
    assert d.verdict("deeper is better", "deeper is worse") == "not resolved at n = 3/3"
    # Unequal n and spreads: the same as scipy's Welch test.
    a, b = [10.0, 12.0, 11.0, 13.0, 9.5], [7.0, 7.4, 6.9]
    d = welch(a, b)
    ref = ttest_ind(b, a, equal_var=False)
    assert d.mean == pytest.approx(sum(b) / 3 - sum(a) / 5)
    assert (d.lo, d.hi) == pytest.approx(tuple(ref.confidence_interval())) and d.df == pytest.approx(ref.df)
    assert d.hi < 0 and d.verdict("deeper is better", "deeper is worse") == "deeper is better"
    assert welch(b, a).verdict("deeper is better", "deeper is worse") == "deeper is worse"


def test_welch_without_spread_or_with_one_run():
    one = welch([5.0], [3.0, 4.0])  # one run has no spread: no interval, never a verdict
    assert one.mean == pytest.approx(-1.5) and one.lo is None and one.hi is None
    assert one.verdict("better", "worse") == "not resolved at n = 2/1" and "n ≥ 2" in one.interval()
    flat = welch([5.0, 5.0], [3.0, 3.0])  # every run equal: a zero-width interval
    assert (flat.lo, flat.hi) == (-2.0, -2.0) and flat.verdict("better", "worse") == "better"
    with pytest.raises(ValueError):
        welch([], [1.0])


def test_welch_with_a_value_that_is_not_finite_gives_no_interval_and_says_why():
    # A loss that overflowed (inf) or an undefined value (nan) on one side: the difference is
    # not a number an interval can be put on; it is shown as such, never as a verdict.
    for a, b in (([1.0, 2.0], [3.0, math.inf]), ([1.0, math.nan, 2.0], [3.0, 4.0]), ([math.inf], [math.inf, 1.0])):
        d = welch(a, b)
        assert not math.isfinite(d.mean) and d.lo is None and d.hi is None, (a, b)
        assert "not finite" in d.interval() and d.verdict("lower", "higher").startswith("not resolved")
        (row,) = differences_table([("rise at r", [("plain56 − resnet56", d)])])[1]
        assert "not finite" in row[4] and "n ≥ 2" not in row[4], row


def _study(known: dict[tuple[int, bool], list[tuple[float, float | None]]], tmp_path) -> optuna.Study:
    """Completed trials with these (test error, final train error) per (depth, plain) cell."""
    study = optuna.create_study()
    dists = {"model.depth": IntDistribution(20, 56), "model.plain": CategoricalDistribution([False, True]),
             "seed_everything": IntDistribution(0, 9)}  # fmt: skip
    for (depth, plain), runs in known.items():
        for seed, (test, train) in enumerate(runs):
            run = tmp_path / f"d{depth}p{plain}s{seed}"
            (run / "csv").mkdir(parents=True)
            (run / "config.yaml").write_text("trainer:\n  max_steps: 1900\n  max_epochs: -1\n")
            if train is not None:  # a constant logged training error: train/error_end = train
                lines = ["step,train/error_step,val/error", *(f"{i},{train}," for i in range(100))]
                (run / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
            study.add_trial(
                optuna.trial.create_trial(
                    params={"model.depth": depth, "model.plain": plain, "seed_everything": seed},
                    distributions=dists,
                    value=test,
                    user_attrs={
                        "test/error": test,
                        "run_dir": str(run),
                        "spec": ResNetSpec(depth=depth, plain=plain).to_dict(),
                    },
                )
            )
    return study


def test_sweep_summary_compares_each_depth_with_the_shallowest(tmp_path):
    known = {
        (20, False): [(10.0, 8.0), (12.0, 9.0), (11.0, 10.0)],
        (56, False): [(9.0, 5.0), (9.5, 6.0), (10.5, 7.0)],  # -1.33 test: not resolved at n = 3
        (20, True): [(20.0, 18.0), (21.0, 19.0), (22.0, 20.0)],
        (56, True): [(40.0, 41.0), (42.0, 42.0), (41.0, 43.0)],  # +20 test, +23 train: resolved
    }
    study = _study(known, tmp_path)
    comps = {c["comparison"]: c for c in depth_comparisons(trial_rows(study))}
    assert set(comps) == {"resnet56 − resnet20", "plain56 − plain20"}
    for (shallow, deep), name in (((20, 56), "resnet56 − resnet20"),):
        a, b = [t for t, _ in known[(shallow, False)]], [t for t, _ in known[(deep, False)]]
        ref = ttest_ind(b, a, equal_var=False).confidence_interval()
        got = comps[name]["test/error"]
        assert got.mean == pytest.approx(sum(b) / 3 - sum(a) / 3)
        assert (got.lo, got.hi) == pytest.approx((ref.low, ref.high))
    plain_train = comps["plain56 − plain20"]["train/error_end"]
    assert plain_train.mean == pytest.approx(23.0)
    text = summarize(study, tmp_path / "summary", "test/error")
    assert "Depth comparisons" in text and "depth_differences.csv" in text
    md = (tmp_path / "summary" / "cells.md").read_text()
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if " − " in line}
    assert "not resolved at n = 3/3" in lines["resnet56 − resnet20"]
    assert "deeper is worse; deeper trains worse" in lines["plain56 − plain20"]
    assert "+20.00 [" in lines["plain56 − plain20"]
    # The paper's number beside ours, from the registry, labelled with both budgets.
    cells_md = {tuple(line.split(" | ")[:2]): line for line in md.splitlines() if line.startswith("| 56 |")}
    resnet56 = cells_md[("| 56", "False")]
    paper = "6.97 (He et al. 2015, Table 6 (CIFAR-10 test); 64k iterations, batch 128)"
    assert f"| 1,900 iterations | {paper} |" in resnet56
    assert "| 1,900 iterations | none reported for this net |" in cells_md[("| 56", "True")]
    with open(tmp_path / "summary" / "depth_differences.csv") as f:
        rows = {(r["comparison"], r["stat"]): r for r in csv.DictReader(f)}
    r = rows[("plain56 − plain20", "test/error")]
    ref = ttest_ind([40.0, 42.0, 41.0], [20.0, 21.0, 22.0], equal_var=False).confidence_interval()
    assert (int(r["n_deep"]), int(r["n_shallow"])) == (3, 3)
    assert (float(r["ci95_lo"]), float(r["ci95_hi"])) == pytest.approx((ref.low, ref.high))


def test_depth_comparison_with_a_single_seed_is_not_resolved(tmp_path):
    study = _study({(20, False): [(10.0, None)], (56, False): [(5.0, None), (6.0, None)]}, tmp_path)
    (c,) = depth_comparisons(trial_rows(study))
    assert c["test/error"].mean == pytest.approx(-4.5) and c["test/error"].lo is None
    assert "train/error_end" not in c  # no training curves were logged
    summarize(study, tmp_path / "s", "test/error")
    line = next(x for x in (tmp_path / "s" / "cells.md").read_text().splitlines() if " − " in x)
    assert "not resolved at n = 2/1" in line and "-4.50 - (needs n ≥ 2 per side)" in line
    assert not math.isnan(c["test/error"].mean)


def _lesion_rows(label: str, intact: float, drops: list[float]) -> list[dict]:
    base = {"checkpoint": label, "study": "single", "condition": "eval-bn", "downsample": False}
    rows = [{**base, "key": "intact", "error": intact, "block": "none", "position": -1}]
    rows += [{**base, "key": f"drop:b{i}", "error": e, "block": f"b{i}", "position": i} for i, e in enumerate(drops)]
    return rows


def _sections(nets: list[tuple[str, int, bool, float, list[float]]]) -> dict:
    """The `single` study's report sections of hand-made rows, by title."""
    from resnet_lab.ablation.studies import REGISTRY

    rows = [r for label, _, _, intact, drops in nets for r in _lesion_rows(label, intact, drops)]
    meta = {
        "checkpoints": [{"label": n[0], "spec": ResNetSpec(depth=n[1], plain=n[2]).to_dict()} for n in nets],
        "options": {"studies": ["single"], "blocks": None},
        "num_classes": 10,
    }
    return {s.title: s for s in REGISTRY["single"].sections(rows, meta)}


def _robustness(nets: list[tuple[str, int, bool, float, list[float]]]) -> dict[str, dict[str, str]]:
    """ablate's deep-vs-shallow robustness table of hand-made single-removal rows, by comparison."""
    head, body = _sections(nets)["Robustness to single-block removal, deeper vs shallower"].table
    return {r[0]: dict(zip(head, r)) for r in body}


def test_ablate_compares_lesion_robustness_deep_vs_shallow():
    # (label, depth, plain, intact error, single-drop errors): increases and shares of the
    # margin below chance (90%) lost, per checkpoint
    nets = [
        ("r20 s0", 20, False, 10.0, [20.0, 30.0]),  # +15, 15/80
        ("r20 s1", 20, False, 12.0, [30.0, 32.0]),  # +19, 19/78
        ("r20 s2", 20, False, 11.0, [28.0, 28.0]),  # +17, 17/79
        ("r56 s0", 56, False, 9.0, [11.0, 13.0]),  # +3, 3/81
        ("r56 s1", 56, False, 10.0, [14.0, 16.0]),  # +5, 5/80
        ("r56 s2", 56, False, 8.0, [12.0, 12.0]),  # +4, 4/82
        ("p20 s0", 20, True, 20.0, [90.0, 90.0]),  # +70; one plain-56 only: no interval
        ("p20 s1", 20, True, 21.0, [89.0, 91.0]),  # +69
        ("p56 s0", 56, True, 50.0, [80.0, 70.0]),  # +25
    ]
    got = _robustness(nets)
    res = got["resnet56 − resnet20"]
    ref = ttest_ind([3.0, 5.0, 4.0], [15.0, 19.0, 17.0], equal_var=False).confidence_interval()
    deep, shallow = [3 / 81, 5 / 80, 4 / 82], [15 / 80, 19 / 78, 17 / 79]
    share = ttest_ind([100 * s for s in deep], [100 * s for s in shallow], equal_var=False).confidence_interval()
    assert res["n (deep/shallow)"] == "3/3"
    assert res["intact, deep / shallow"] == "9.00 / 11.00" and res["one removed, deep / shallow"] == "13.00 / 28.00"
    assert res["increase Δ [95% CI]"] == f"-13.00 [{ref.low:+.2f}, {ref.high:+.2f}]"
    m = 100 * (sum(deep) - sum(shallow)) / 3
    assert res["margin lost, deep / shallow"] == f"{100 * sum(deep) / 3:.1f}% / {100 * sum(shallow) / 3:.1f}%"
    assert res["margin lost Δ [95% CI]"] == f"{m:+.2f} [{share.low:+.2f}, {share.high:+.2f}]"
    assert res["verdict"] == "deeper is more robust"
    plain = got["plain56 − plain20"]
    assert plain["increase Δ [95% CI]"].startswith("-44.50 -") and plain["verdict"] == "not resolved at n = 1/2"
    # One architecture only: no comparison section.
    titles = _sections([n for n in nets if n[0].startswith("r20")])
    assert not any("deeper vs shallower" in t for t in titles)


def test_lesion_robustness_is_judged_on_the_margin_left_above_chance():
    # The plain nets of the README's seeded study: plain-56 starts at 60% error, so a removal
    # can add only ~30 points before chance (90%), plain-20's adds 63. The raw increase
    # called the deeper net "more robust"; both end near chance: neither is.
    plain = [
        ("p20 s0", 20, True, 26.0, [89.66]),
        ("p20 s1", 20, True, 24.2, [88.57]),
        ("p20 s2", 20, True, 26.0, [89.07]),
        ("p56 s0", 56, True, 58.9, [86.11]),
        ("p56 s1", 56, True, 58.1, [86.03]),
        ("p56 s2", 56, True, 62.5, [87.42]),
    ]
    row = _robustness(plain)["plain56 − plain20"]
    assert row["increase Δ [95% CI]"].startswith("-37.01 [-40.")  # resolved on the raw scale, and misleading
    assert row["verdict"] == "both within 5 points of chance after one removal: neither is robust"
    # Nets that differ in intact error but keep a margin: the same share of it lost is no
    # difference in robustness, though the raw increases differ by 10 points.
    margin = [
        ("r20 s0", 20, False, 20.0, [50.0]),  # +30 of 70
        ("r20 s1", 20, False, 21.0, [52.0]),  # +31 of 69
        ("r20 s2", 20, False, 19.0, [48.0]),  # +29 of 71
        ("r56 s0", 56, False, 40.0, [60.0]),  # +20 of 50
        ("r56 s1", 56, False, 41.0, [62.0]),  # +21 of 49
        ("r56 s2", 56, False, 39.0, [58.0]),  # +19 of 51
    ]
    row = _robustness(margin)["resnet56 − resnet20"]
    assert row["increase Δ [95% CI]"].startswith("-10.00 [-1")  # the raw interval excludes 0
    assert row["margin lost, deep / shallow"] == "40.0% / 42.9%"
    assert row["verdict"] == "not resolved at n = 3/3"


def test_summary_of_a_single_depth_says_why_it_has_no_depth_comparison(tmp_path):
    # Issue 26 §A: with one depth the depth section was silently absent.
    study = _study({(20, False): [(10.0, None), (11.0, None)], (20, True): [(20.0, None)]}, tmp_path)
    text = summarize(study, tmp_path / "s", "test/error")
    assert "Depth comparisons: none: the study has one depth (20)" in text
    assert "## Depth comparisons" in (tmp_path / "s" / "cells.md").read_text()  # the table says so too


def test_summary_plots_draw_each_architecture_apart_and_every_lesion_metric(tmp_path):
    # Issue 24 §8: the lesion plot grouped only by `plain` (pre- and post-activation nets of one
    # depth were one line) and drew only lesion/mean_single_error.
    from resnet_lab.ablation.stats import depth_family
    from resnet_lab.sweep.plots import _by_arch, plot_lesions

    rows = []
    for preact in (False, True):
        for depth in (20, 56):
            for seed in (0, 1):
                spec = ResNetSpec(depth=depth, preact=preact).to_dict()
                rows.append({"number": len(rows), "state": "COMPLETE", "seed": seed, "model.depth": depth,
                             "model.preact": preact, "depth": depth, "net": ResNetSpec.from_dict(spec).name,
                             "family": depth_family(spec), "lesion/mean_single_error": 10.0 + depth + 5 * preact + seed,
                             "lesion/kmax_error": 50.0 + seed, "lesion/k2_error": 40.0})  # fmt: skip
    groups = _by_arch(rows)
    assert set(groups) == {"resnet", "preact_resnet"}
    assert all({r["depth"] for r in rs} == {20, 56} and len(rs) == 4 for rs in groups.values())
    made = plot_lesions(rows, tmp_path)
    names = ["k2_error_vs_depth.png", "kmax_error_vs_depth.png", "mean_single_error_vs_depth.png"]
    assert sorted(Path(p).name for p in made) == names  # k2: a metric the k study names per level


def test_net_differences_pair_deep_with_shallow_and_plain_with_residual_never_init_with_trained():
    from resnet_lab.ablation.stats import net_differences, welch
    from resnet_lab.models import resolve_spec

    vals, cks = {}, []
    for name, base in (("resnet20", 1.0), ("resnet56", 2.0), ("plain20", 3.0), ("plain56", 7.0)):
        for seed in range(3):
            label = f"{name} s{seed}"
            vals[label] = base + 0.1 * seed * (1 + len(name))
            cks.append({"label": label, "spec": resolve_spec(name).to_dict()})
        cks.append({"label": f"{name} init", "spec": resolve_spec(name).to_dict(), "init": True})
        vals[f"{name} init"] = 100.0
    got = dict(net_differences(vals, cks))

    def side(name):
        return [vals[f"{name} s{s}"] for s in range(3)]

    assert set(got) == {"resnet56 − resnet20", "plain56 − plain20", "plain20 − resnet20", "plain56 − resnet56",
                        "resnet56 (init) − resnet20 (init)", "plain56 (init) − plain20 (init)",
                        "plain20 (init) − resnet20 (init)", "plain56 (init) − resnet56 (init)"}  # fmt: skip
    assert got["plain56 − resnet56"] == welch(side("resnet56"), side("plain56"))
    assert got["resnet56 − resnet20"].mean == pytest.approx(sum(side("resnet56")) / 3 - sum(side("resnet20")) / 3)
    assert got["plain56 (init) − resnet56 (init)"].mean == 0 and got["plain56 (init) − resnet56 (init)"].lo is None


def _repeats_study(tmp_path, errors: dict[int, list[float]], seed_of_run=lambda i: 0) -> optuna.Study:
    """A random/TPE sweep over depth alone (no seed in its space): the sampler may draw a cell
    twice, and each draw trains the config's seed again (its run.json says which seed ran)."""
    study = optuna.create_study()
    dists = {"model.depth": CategoricalDistribution([20, 56])}
    i = 0
    for depth, values in errors.items():
        for e in values:
            run = tmp_path / f"run{i}"
            run.mkdir()
            (run / "run.json").write_text(f'{{"seed": {seed_of_run(i)}}}')
            attrs = {"test/error": e, "run_dir": str(run), "spec": ResNetSpec(depth=depth).to_dict()}
            trial = optuna.trial.create_trial(
                params={"model.depth": depth}, distributions=dists, value=e, user_attrs=attrs
            )
            study.add_trial(trial)
            i += 1
    return study


def test_a_cell_drawn_twice_with_the_same_seed_is_one_run_not_two(tmp_path):
    # Two runs of one cell and one seed are the same experiment twice, not two samples: pooled as
    # n = 2/2 they gave a zero-width Welch interval and the verdict "deeper is worse" from what is
    # one run a side. (And without a seed in the space, the summary crashed sorting None seeds.)
    study = _repeats_study(tmp_path, {20: [10.0, 10.0], 56: [12.0, 12.0, 12.0]})
    rows = trial_rows(study)
    (c,) = depth_comparisons(rows)
    d = c["test/error"]
    assert (d.n_a, d.n_b) == (1, 1) and d.lo is None and d.mean == pytest.approx(2.0)
    text = summarize(study, tmp_path / "s", "test/error")
    from resnet_lab.sweep.summary import cells

    got = {c["model.depth"]: c for c in cells(rows)}
    assert got[20]["n"] == 1 and got[56]["n"] == 1 and got[20]["seeds"] == [0]
    md = (tmp_path / "s" / "cells.md").read_text()
    assert "not resolved at n = 1/1" in md and "| 20 | 1 | 0 | 10.00 (n = 1)" in md
    for where in (text, md):  # each repeat is named, with the run it repeats
        assert "trial 1 repeats trial 0" in where and "trials 3, 4 repeat trial 2" in where, where


def test_runs_of_one_cell_with_different_seeds_all_count(tmp_path):
    # seed_everything: true draws a new seed per run: the same cell twice is then two samples.
    study = _repeats_study(tmp_path, {20: [10.0, 11.0], 56: [12.0, 13.0]}, seed_of_run=lambda i: 100 + i)
    (c,) = depth_comparisons(trial_rows(study))
    assert (c["test/error"].n_a, c["test/error"].n_b) == (2, 2) and c["test/error"].lo is not None


def test_summary_plots_pool_only_the_seeds_of_one_cell(tmp_path, monkeypatch):
    # A sweep over the learning rate as well as depth: each lr is its own line in the lesion plot
    # and the training curves (they pooled every lr of a depth as "seeds"), and a cell trained again
    # with the same seed (trial 8) is one run, not a second sample.
    import matplotlib.axes

    from resnet_lab.ablation.stats import depth_family
    from resnet_lab.sweep.plots import plot_lesions, plot_training_curves

    drawn = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda ax, x, y, **kw: drawn.setdefault(kw["label"], (x, y)))
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, y, **kw: drawn.setdefault(kw["label"], (x, y)))
    rows = []
    for lr in (0.1, 0.01):
        for depth in (20, 56):
            for seed in (0, 1):
                run = tmp_path / f"run{len(rows)}"
                (run / "csv").mkdir(parents=True)
                err = depth + 100 * lr + seed  # lr 0.1: 30/31 and 66/67; lr 0.01: 21/22 and 57/58
                (run / "csv" / "metrics.csv").write_text(f"step,train/error_step,val/error\n1,{err},\n2,{err},\n")
                spec = ResNetSpec(depth=depth).to_dict()
                rows.append({"number": len(rows), "state": "COMPLETE", "seed": seed, "model.depth": depth,
                             "optimizer.lr": lr, "depth": depth, "net": f"resnet{depth}", "run_dir": str(run),
                             "family": depth_family(spec), "lesion/mean_single_error": err})  # fmt: skip
    rows.append({**rows[0], "number": 8, "lesion/mean_single_error": 99.0})  # lr 0.1, depth 20, seed 0 again
    plot_lesions(rows, tmp_path)
    lines = {k: v for k, v in drawn.items() if "(n=" in k and "train" not in k and "val" not in k}
    assert {k: list(v[1]) for k, v in lines.items()} == {
        "resnet, optimizer.lr=0.01 (n=2)": [21.5, 57.5],
        "resnet, optimizer.lr=0.1 (n=2)": [30.5, 66.5],
    }
    drawn.clear()
    plot_training_curves(rows, tmp_path)
    curves = {k: list(v[1]) for k, v in drawn.items() if k.endswith("(n=2)")}
    assert curves["resnet, optimizer.lr=0.1-20 train (n=2)"] == [30.5, 30.5], drawn
    assert curves["resnet, optimizer.lr=0.01-56 train (n=2)"] == [57.5, 57.5], drawn
