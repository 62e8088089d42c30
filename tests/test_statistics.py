"""Honest numbers: Wilson intervals, aggregation over seeds and checkpoints, seeds and
per-cell overrides in sweeps."""

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution, IntDistribution

from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.report import seeds_table
from resnet_lab.ablation.stats import across_checkpoints, wilson
from resnet_lab.sweep.cli import main as sweep_main
from resnet_lab.sweep.space import SweepError, SweepSpec
from resnet_lab.sweep.summary import cells, summarize, trial_rows

from .conftest import DEPTH, load, tiny_config


def test_wilson_interval_on_known_counts():
    lo, hi = wilson(10, 100)  # Wilson (1927) / Newcombe (1998): 10/100 -> 0.0552 .. 0.1744
    assert lo == pytest.approx(5.523, abs=1e-3) and hi == pytest.approx(17.437, abs=1e-3)
    lo, hi = wilson(0, 50)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(7.135, abs=1e-3)
    lo, hi = wilson(500, 1000)  # symmetric at p = 0.5; half-width 3.093 points (Wald: 3.099)
    assert 50 - lo == pytest.approx(hi - 50) and hi - 50 == pytest.approx(3.093, abs=0.001)


def test_summary_aggregates_cells_over_seeds(tmp_path):
    study = optuna.create_study()
    dists = {"model.depth": IntDistribution(20, 56), "model.plain": CategoricalDistribution([False, True]),
             "seed_everything": IntDistribution(0, 2)}  # fmt: skip
    known = {(20, False): [8.0, 9.0, 13.0], (56, False): [7.0, 7.5], (20, True): [10.0]}
    run = tmp_path / "run"  # csv/metrics.csv: train error 100 - step, then 5 or 6 over the last 10 steps
    (run / "csv").mkdir(parents=True)
    lines = ["step,train/error_step,val/error"] + [f"{i},{100 - i if i < 90 else 5 + (i % 2)}," for i in range(100)]
    (run / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    for (depth, plain), errors in known.items():
        for seed, e in enumerate(errors):
            study.add_trial(
                optuna.trial.create_trial(
                    params={"model.depth": depth, "model.plain": plain, "seed_everything": seed},
                    distributions=dists,
                    value=e,
                    user_attrs={
                        "test/error": e,
                        "best_test/error": e + 1,
                        "run_dir": str(run),
                        "spec": {"depth": depth, "plain": plain},
                    },
                )
            )
    study.add_trial(
        optuna.trial.create_trial(
            params={"model.depth": 20, "model.plain": False, "seed_everything": 2},
            distributions=dists,
            state=optuna.trial.TrialState.FAIL,
        )
    )
    got = {(c["model.depth"], c["model.plain"]): c for c in cells(trial_rows(study))}
    assert set(got) == set(known)
    for key, errors in known.items():
        c = got[key]
        assert c["n"] == len(errors)  # the failed trial is not counted
        assert c["test/error"]["mean"] == pytest.approx(statistics.fmean(errors))
        if len(errors) > 1:
            assert c["test/error"]["std"] == pytest.approx(statistics.stdev(errors))
        else:  # one run has no sample spread
            assert c["test/error"]["std"] is None
        assert (c["test/error"]["min"], c["test/error"]["max"]) == (min(errors), max(errors))
        assert c["train/error_end"]["mean"] == pytest.approx(5.5)  # the last 10% of the logged steps
        assert c["best_test/error"]["mean"] == pytest.approx(statistics.fmean(errors) + 1)
    text = summarize(study, tmp_path, "test/error")
    assert "10.00 ± 2.65 (8.00, 13.00)" in text  # depth 20 residual: mean 10, std 2.646
    md = (tmp_path / "cells.md").read_text()
    assert "10.00 ± 2.65 (8.00, 13.00)" in md and "| 3 |" in md and "| 1 |" in md
    with open(tmp_path / "cells.csv", newline="") as f:
        rows = {(r["model.depth"], r["model.plain"]): r for r in csv.DictReader(f)}
    assert float(rows[("56", "False")]["test_error_mean"]) == pytest.approx(7.25) and rows[("56", "False")]["n"] == "2"
    assert rows[("20", "False")]["seeds"] == "0, 1, 2" and "| 3 | 0, 1, 2 | 10.00 ± 2.65" in md  # which runs
    assert (tmp_path / "error_vs_depth.png").exists()


@pytest.mark.slow
def test_seeds_and_cell_overrides_reach_exactly_their_cells(tmp_path):
    sweep = {
        "study_name": "o",
        "seeds": [3, 4],
        "space": {"model.depth": [8, 14]},
        "overrides": [{"when": {"model.depth": 14}, "set": {"optimizer.init_args.weight_decay": 0.5}}],
    }
    cfg = tiny_config(tmp_path, sweep)
    assert sweep_main(["--config", DEPTH, "--config", cfg]) == 0
    trials = load(tmp_path, "o").trials
    seen = set()
    for t in trials:
        run_cfg = yaml.safe_load(
            (tmp_path / "sweeps" / "o" / "runs" / f"trial{t.number}").glob("*/config.yaml").__next__().read_text()
        )
        depth, seed = t.params["model.depth"], t.params["seed_everything"]
        assert run_cfg["seed_everything"] == seed and run_cfg["model"]["depth"] == depth
        assert run_cfg["optimizer"]["init_args"]["weight_decay"] == (0.5 if depth == 14 else 0.0001)
        seen.add((depth, seed))
    assert seen == {(8, 3), (8, 4), (14, 3), (14, 4)}  # every cell once per seed
    assert SweepSpec.from_dict({**sweep, "space": {"model.plain": [True]}}).inactive_overrides() == [
        (0, ["model.depth"])
    ]
    typo = tiny_config(
        tmp_path,
        {**sweep, "study_name": "t", "overrides": [{"when": {"model.dept": 8}, "set": {"seed_everything": 1}}]},
        "t.yaml",
    )
    assert sweep_main(["--config", DEPTH, "--config", typo]) == 2
    with pytest.raises(SweepError, match="grid"):
        SweepSpec.from_dict({**sweep, "sampler": "random", "n_trials": 2, "metric": "val/error"})


def test_ablate_pools_checkpoints_of_one_architecture(two_checkpoints, tmp_path):
    res = two_checkpoints[0]
    other, third = tmp_path / "seed1" / "last.ckpt", tmp_path / "seed2" / "last.ckpt"
    for seed, path in ((1, other), (2, third)):  # more "seeds": same spec, other weights
        path.parent.mkdir()
        ck = torch.load(res, weights_only=False)
        g = torch.Generator().manual_seed(seed)
        ck["state_dict"] = {k: v + 0.3 * torch.randn(v.shape, generator=g) if k.endswith("conv2.weight") else v
                            for k, v in ck["state_dict"].items()}  # fmt: skip
        torch.save(ck, path)
    out = tmp_path / "rep"
    argv = [res, str(other), str(third), "--out", str(out), "--studies", "single", "k", "--k-max", "2"]
    assert ablate_main([*argv, "--samples", "3", "--limit", "120", "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert len({r["checkpoint"] for r in rows}) == 3  # each seed's rows stay
    for r in rows:  # every evaluation carries its Wilson interval
        assert (r["error_ci_lo"], r["error_ci_hi"]) == pytest.approx(wilson(r["wrong"], r["n"]))
        assert r["error"] == pytest.approx(100 * r["wrong"] / r["n"])
    with open(out / "results_by_arch.csv", newline="") as f:
        agg = {(r["study"], r["key"]): r for r in csv.DictReader(f) if r["condition"] == "eval-bn"}
    by_ck = {}
    for r in rows:
        if r["study"] == "single" and r["key"] == "drop:layer2.0":
            by_ck[r["checkpoint"]] = r["error"]
    a = agg[("single", "drop:layer2.0")]
    assert int(a["n_checkpoints"]) == 3
    assert float(a["mean"]) == pytest.approx(statistics.fmean(by_ck.values()))
    assert float(a["std"]) == pytest.approx(statistics.stdev(by_ck.values()))
    k2 = {}
    for r in rows:
        if r["study"] == "k" and r["k"] == 2:
            k2.setdefault(r["checkpoint"], []).append(r["error"])
    per_ck = [statistics.fmean(v) for v in k2.values()]
    assert float(agg[("k", "k=2")]["mean"]) == pytest.approx(statistics.fmean(per_ck))
    assert float(agg[("k", "k=2")]["std"]) == pytest.approx(statistics.stdev(per_ck))
    md = (out / "report.md").read_text()
    assert "mean over blocks" in md and "Wilson" in md and (out / "across_seeds.png").exists()


def test_pooling_never_merges_different_architectures():
    from resnet_lab.ablation.stats import arch_label
    from resnet_lab.models import create_model

    names = {
        arch_label(create_model(n, **kw).spec.to_dict())
        for n, kw in [
            ("resnet20", {}),
            ("preact_resnet20", {}),
            ("preact_resnet20", {"stochastic_depth": "batch"}),
            ("preact_resnet20", {"stochastic_depth": "sample"}),
            ("preact_resnet20", {"stochastic_depth": "batch", "survival_last": 0.8}),
            ("preact_resnet20", {"active_blocks": 4}),
            ("resnet56", {}),
            ("cifar_resnet", {"depth": 56, "block_type": "bottleneck", "shortcut": "B"}),
            ("resnet20", {"shortcut": "B"}),
            ("plain20", {}),
        ]
    }
    assert len(names) == 10
    assert arch_label(create_model("resnet20").spec.to_dict()) == "resnet20, shortcut A"  # unchanged labels
    old = {k: v for k, v in create_model("resnet56").spec.to_dict().items() if k in ("family", "depth", "plain",
           "shortcut", "base_width", "stride_on")}  # fmt: skip
    assert arch_label(old) == "resnet56, shortcut A"  # rows written before the new spec fields


def test_pooling_a_value_that_is_not_finite_says_so_and_pools_the_rest():
    """One seed's landscape overflowed (its rise at r is inf): the architecture's mean is inf, its
    std undefined, and the seeds table says the value is not finite instead of crashing; the other
    key pools as usual."""
    rows = [{"arch": "resnet56", "spec": "resnet56", "checkpoint": f"s{i}", "condition": "eval-bn",
             "study": "landscape", "rise": v, "centre": c}
            for i, (v, c) in enumerate([(0.5, 1.0), (math.inf, 2.0), (1.5, 3.0)])]  # fmt: skip
    agg = across_checkpoints(rows, lambda r: [("rise at r", r["rise"]), ("centre loss", r["centre"])])
    by = {a["key"]: a for a in agg}
    assert math.isinf(by["rise at r"]["mean"]) and math.isnan(by["rise at r"]["std"])
    assert by["rise at r"]["n_checkpoints"] == 3
    assert by["centre loss"]["mean"] == 2.0 and by["centre loss"]["std"] == 1.0
    body = {r[2]: r[5] for r in seeds_table(agg)[1]}
    assert body["rise at r"] == "not finite (1 of 3 checkpoints)" and body["centre loss"].startswith("2.0000 ± 1.0000")


def test_checkpoints_of_one_training_run_or_seed_pool_as_one_sample(two_checkpoints, tmp_path):
    # The "across seeds" table and every Welch interval pool checkpoints of one architecture as
    # independent runs. A run's last and best checkpoints, a second run of the same seed, or a copy
    # of a file are one run: pooled, they gave "87.50 ± 0.00 over seeds" from one trained net.
    last = Path(two_checkpoints[0])
    (best,) = last.parent.glob("best-*.ckpt")
    again = tmp_path / "runs" / "resnet14" / "again"  # the same command run twice: seed 0 both times
    shutil.copytree(last.parent.parent, again)
    copy = tmp_path / "copy.ckpt"  # a checkpoint copied out of its run folder
    shutil.copy(last, copy)
    out = tmp_path / "rep"
    argv = [str(last), str(best), str(again / "checkpoints" / "last.ckpt"), str(copy)]
    assert ablate_main([*argv, "--out", str(out), "--studies", "single", "--limit", "60", "--no-progress"]) == 0
    with open(out / "results_by_arch.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []  # one sample of each selection: nothing to pool
    md = (out / "report.md").read_text()
    section = md.split("## Across checkpoints")[1]
    assert "Fewer than two" in section
    assert section.count("same training run as") == 2 and "seed 0" in section, section
    listed = md.split("## Checkpoints")[1].split("##")[0]  # each trained checkpoint's seed, from its run.json
    assert listed.count("training: seed 0, ") == 3 and "copy.ckpt; spec" in listed, listed


def test_pooling_keeps_trained_and_untrained_nets_and_best_and_last_apart():
    # Single-block robustness (deep vs shallow) pooled an init: net with a trained one of its depth.
    from resnet_lab.ablation.stats import net_differences, samples
    from resnet_lab.ablation.studies.single import robustness
    from resnet_lab.models import resolve_spec

    cks, rows, values = [], [], {}
    for name in ("resnet20", "resnet56"):
        for kind, intact, dropped in (("s0", 10.0, 20.0), ("s1", 11.0, 22.0), ("init", 90.0, 90.0),
                                      ("best", 9.0, 19.0)):  # fmt: skip
            label = f"{name} {kind}"
            cks.append({"label": label, "spec": resolve_spec(name).to_dict(), "init": kind == "init",
                        "path": f"/r/{name}-{kind[-1]}/checkpoints/{'best-step9' if kind == 'best' else 'last'}.ckpt",
                        "sample": [f"seed {kind[-1]}"] if kind != "best" else ["seed 0"]})  # fmt: skip
            base = {"checkpoint": label, "study": "single", "condition": "eval-bn"}
            rows += [{**base, "key": "intact", "error": intact}, {**base, "key": "drop:a", "error": dropped}]
            values[label] = intact
    pools, notes = samples(cks)
    assert pools["resnet20 s0"] == pools["resnet20 s1"] != pools["resnet20 init"] != pools["resnet20 best"]
    assert notes == []  # best and last of seed 0 are different selections: each is a sample of its own
    comps = {c["comparison"]: c["increase"] for c in robustness(rows, {"checkpoints": cks, "num_classes": 10})}
    assert set(comps) == {"resnet56 − resnet20", "resnet56 (init) − resnet20 (init)",
                          "resnet56 [best-by-val] − resnet20 [best-by-val]"}  # fmt: skip
    assert (comps["resnet56 − resnet20"].n_a, comps["resnet56 − resnet20"].n_b) == (2, 2)
    diffs = dict(net_differences(values, cks))
    assert (diffs["resnet56 − resnet20"].n_a, diffs["resnet56 [best-by-val] − resnet20 [best-by-val]"].n_a) == (2, 1)
    # A checkpoint of a seed already pooled is left out, and said so.
    cks.append({**cks[0], "label": "resnet20 s0 again", "path": "/r/other/checkpoints/last.ckpt"})
    values["resnet20 s0 again"] = 50.0
    pools, notes = samples(cks)
    assert "resnet20 s0 again" not in pools and len(notes) == 1 and "resnet20 s0" in notes[0]
    assert dict(net_differences(values, cks))["resnet56 − resnet20"].n_a == 2


def test_checkpoints_of_one_architecture_trained_with_different_recipes_are_not_pooled():
    # An lr sweep's checkpoints of one net are not seeds of one experiment: pooled, two learning
    # rates passed for "the spread between independently trained networks"; and two of them that
    # share seed 0 are different runs, not one run twice.
    from resnet_lab.ablation.stats import net_differences, samples
    from resnet_lab.models import resolve_spec

    def ck(label, name, lr, seed):
        recipe = {"optimizer.init_args.lr": lr, "trainer.max_steps": 1900}
        return {"label": label, "spec": resolve_spec(name).to_dict(), "path": f"/r/{label}/checkpoints/last.ckpt",
                "sample": [f"seed {seed}"], "recipe": recipe}  # fmt: skip

    cks = [ck("a", "resnet20", 0.1, 0), ck("b", "resnet20", 0.01, 0), ck("c", "resnet20", 0.1, 1),
           ck("d", "resnet56", 0.1, 0), ck("e", "resnet56", 0.1, 1)]  # fmt: skip
    pools, notes = samples(cks)
    assert set(pools) == {"d", "e"}
    (note,) = notes
    assert "resnet20, shortcut A" in note and "optimizer.init_args.lr (0.01, 0.1)" in note and "same" not in note
    values = {c["label"]: float(i) for i, c in enumerate(cks)}
    assert dict(net_differences(values, cks)) == {}  # resnet56 has no resnet20 pool to be compared with
    cks[1]["recipe"] = dict(cks[0]["recipe"])  # one recipe: b repeats a's seed
    pools, notes = samples(cks)
    assert set(pools) == {"a", "c", "d", "e"} and len(notes) == 1 and "b: the same training run as a" in notes[0]


def test_a_run_s_recipe_is_its_config_but_for_seed_paths_logging_and_evaluation(tmp_path):
    from resnet_lab.ablation.runner import run_config, run_recipe

    cfg = {"seed_everything": 3, "run": {"root": "/x", "name": "trial4"}, "ckpt_path": "last",
           "trainer": {"max_steps": 1900, "enable_progress_bar": False, "devices": 2, "check_val_every_n_epoch": 2},
           "model": {"depth": 20, "channels_last": True, "label_smoothing": 0.1},
           "data": {"class_path": "C", "init_args": {"folder": "/d.tar.gz", "batch_size": 128, "ten_crop": True}},
           "optimizer": {"init_args": {"lr": 0.1}}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    recipe = run_recipe(run_config(tmp_path))
    assert recipe == {"trainer.max_steps": 1900, "model.depth": 20, "model.label_smoothing": 0.1,
                      "data.class_path": "C", "data.init_args.batch_size": 128,
                      "optimizer.init_args.lr": 0.1}  # fmt: skip
    assert run_recipe(run_config(tmp_path / "gone")) is None and run_recipe(run_config(None)) is None
