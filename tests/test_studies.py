"""The study plug-ins: results pinned against the pre-plug-in runner, and the registry
as the one source of every study's name and options."""

import csv
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from resnet_lab.ablation.cli import main as ablate_main

from .conftest import trained_like

GOLDEN = Path(__file__).parent / "data" / "ablate_golden.csv"
# The command the golden file was written with (by the runner before studies became
# plug-ins, commit 9f8077c): every study, BN recalibration, a --blocks subset. Since then
# only the losses of 8 'recalibrated-bn' rows changed, by design: their training images
# are now drawn from --seed, no longer from the process's PL_GLOBAL_SEED.
GOLDEN_ARGS = [
    "--studies", "single", "k", "reorder", "responses", "paths",
    "--blocks", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.1",
    "--k-max", "2", "--samples", "3", "--seed", "1", "--limit", "120", "--batch-size", "50",
    "--bn-recalib", "64", "--paths-images", "16", "--no-progress",
]  # fmt: skip


def write_checkpoint(path: Path, name: str, seed: int = 0) -> str:
    """A fit-like checkpoint of a seeded, BN-perturbed net on the synthetic set (no training,
    so its numbers depend on nothing but the code)."""
    model = trained_like(name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"source": "synthetic", "val_size": 200, "eval_subset": None, "batch_size": 32}
    torch.save(
        {
            "hyper_parameters": {"spec": model.spec.to_dict()},
            "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
            "datamodule_hyper_parameters": data,
            "global_step": 0,
        },
        path,
    )
    return str(path)


def golden_run(tmp_path) -> list[dict]:
    """The golden command, on one thread: float sums depend on how a convolution splits
    its work, and an earlier test (a sweep worker slot) may have changed the thread count."""
    cks = [write_checkpoint(tmp_path / d / "net.ckpt", d) for d in ("resnet14", "plain14")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert ablate_main([*cks, "--out", str(tmp_path / "rep"), *GOLDEN_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "rep" / "results.csv") as f:
        return list(csv.DictReader(f))


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-9)


@pytest.mark.slow
def test_results_csv_is_unchanged_by_the_study_plug_ins(tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # as a fresh `ablate` process
    rows = golden_run(tmp_path)
    with open(GOLDEN) as f:
        golden = list(csv.DictReader(f))
    assert list(rows[0]) == list(golden[0]), "columns changed"
    assert len(rows) == len(golden)
    for got, want in zip(rows, golden):
        bad = {k: (got[k], want[k]) for k in want if not _same(got[k], want[k])}
        assert not bad, (want["study"], want["key"], bad)
    # Integers that count images are exact, never approximately equal.
    for got, want in zip(rows, golden):
        for k in ("wrong", "n", "k", "grad_n"):
            assert got.get(k) == want.get(k)


def test_every_study_option_is_an_ablate_flag_and_a_sweep_key_with_one_default():
    from dataclasses import fields

    from resnet_lab.ablation.cli import parser
    from resnet_lab.ablation.studies import REGISTRY, StudyOptions
    from resnet_lab.sweep.space import ablation_defaults, ablation_keys

    args = parser().parse_args(["x.ckpt", "--out", "o"])
    names = [f.name for f in fields(StudyOptions)]
    assert set(ablation_keys()) == set(names)
    for f in fields(StudyOptions):
        parsed = getattr(args, f.name)
        assert (tuple(parsed) if isinstance(parsed, list) else parsed) == f.default == ablation_defaults()[f.name]
    for study in REGISTRY:
        assert {f.name for f in fields(study.Options)} <= set(names), study.name
    assert args.studies == [s.name for s in REGISTRY if s.default]


def test_study_names_are_literals_only_in_their_own_module_and_registration():
    import re

    from resnet_lab.ablation.studies import REGISTRY

    root = Path(__file__).resolve().parents[1] / "resnet_lab"
    for study in REGISTRY:
        own = {root / "ablation" / "studies" / f"{study.name}.py", root / "ablation" / "studies" / "__init__.py"}
        # "k" is also the path-length column of the paths rows: only its uses as a study name count.
        pattern = (
            rf"""["']{study.name}["']"""
            if len(study.name) > 1
            else rf"""(==\s*["']{study.name}["']|["']{study.name}["']\s*(in|==)\b|studies.*["']{study.name}["'])"""
        )
        for path in root.rglob("*.py"):
            if path in own:
                continue
            hits = [line for line in path.read_text().splitlines() if re.search(pattern, line)]
            assert not hits, (study.name, str(path), hits)


def test_options_are_checked_once_for_ablate_and_sweep():
    from resnet_lab.ablation.studies import StudyOptions
    from resnet_lab.ablation.study import UserError

    assert StudyOptions(studies=["single", "k"]).studies == ("single", "k")  # a YAML list becomes a tuple
    for bad, words in [
        ({"studies": "single"}, "must be a list"),
        ({"studies": ["nope"]}, "unknown studies ['nope']"),
        ({"k_max": 0}, "k_max=0 must be an integer >= 1"),
        ({"bn_recalib": 0}, "bn_recalib=0"),
        ({"limit": True}, "limit=True"),
        ({"split": "train"}, "split='train'"),
        ({"blocks": "layer1.0"}, "must be a list"),
    ]:
        with pytest.raises(UserError, match=re.escape(words)):
            StudyOptions(**bad)
    # YAML 1.1 reads a bare `on`/`off` (in a sweep's ablation: section) as a boolean: an on/off
    # choice takes it as the word it was; other choices still refuse a boolean.
    assert StudyOptions(studies=["hessian"], hessian_per_stage=True).hessian_per_stage == "on"
    assert StudyOptions(studies=["hessian"], hessian_per_stage=False).hessian_per_stage == "off"
    assert yaml.safe_load("hessian_per_stage: on") == {"hessian_per_stage": True}
    with pytest.raises(UserError, match=re.escape("landscape_bn=True: use one of eval, recalibrated")):
        StudyOptions(studies=["landscape"], landscape_bn=True)


def test_bn_recalibration_images_follow_the_ablation_seed_not_the_environment(tmp_path, monkeypatch):
    """`--bn-recalib N` re-estimates BN on N training images drawn from `--seed`: the same
    command gives the same rows in a fresh process and inside a sweep (whose fit has set
    PL_GLOBAL_SEED), and another --seed draws other images."""
    ck = write_checkpoint(tmp_path / "resnet8" / "net.ckpt", "resnet8")
    args = ["--studies", "single", "--bn-recalib", "40", "--limit", "100", "--batch-size", "50", "--no-progress"]

    def recalibrated(out: str, *extra: str) -> list[tuple[str, float]]:
        assert ablate_main([ck, "--out", str(tmp_path / out), *args, *extra]) == 0
        with open(tmp_path / out / "results.csv") as f:
            return [(r["key"], float(r["loss"])) for r in csv.DictReader(f) if r["condition"] == "recalibrated-bn"]

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    fresh = recalibrated("a")
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert recalibrated("b") == fresh
    assert recalibrated("c", "--seed", "1") != fresh


def test_float_options_are_checked_finite_and_positive_where_declared():
    # Issue 24 §1: the option kinds gain floats (a radius, a tolerance); nan and inf never pass.
    from dataclasses import dataclass

    from resnet_lab.ablation.study import AblationError, check_fields, option

    @dataclass(frozen=True)
    class Opts:
        radius: float = option(1.0, "a radius", kind="float>0")
        shift: float = option(0.0, "a shift", kind="float")

    for radius, shift in ((0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (float("inf"), 0.0), (1.0, float("-inf")),
                          (True, 0.0), ("1", 0.0)):  # fmt: skip
        with pytest.raises(AblationError, match="must be a finite number"):
            check_fields(Opts(radius, shift))
    ok = Opts(2, -3)
    check_fields(ok)
    assert (ok.radius, ok.shift) == (2.0, -3.0) and isinstance(ok.radius, float)


def test_reorder_says_which_nets_have_nothing_to_swap_and_refuses_when_none_has(tmp_path, capsys):
    """resnet8 has one block a stage: no two shape-compatible blocks. Beside resnet14 it gets no
    rows and the report names it; alone the study would do nothing and exit 0: refused."""
    r8 = write_checkpoint(tmp_path / "resnet8" / "net.ckpt", "resnet8")
    r14 = write_checkpoint(tmp_path / "resnet14" / "net.ckpt", "resnet14")
    args = ["--studies", "reorder", "--samples", "2", "--limit", "32", "--no-progress"]
    out = tmp_path / "mixed"
    assert ablate_main([r8, r14, "--out", str(out), *args]) == 0
    with open(out / "results.csv") as f:
        nets = {r["spec"] for r in csv.DictReader(f) if r["study"] == "reorder"}
    assert nets == {"resnet14"}
    assert "Not reordered: resnet8 (no two shape-compatible blocks)." in (out / "report.md").read_text()
    assert ablate_main([r8, "--out", str(tmp_path / "alone"), *args]) == 2
    err = capsys.readouterr().err
    assert "reorder: none of these nets has two shape-compatible blocks to swap (resnet8)" in err
    assert err.count("\n") == 1 and not (tmp_path / "alone").exists()
