"""The adjacent-blocks study against a full forward of the net with each run removed."""

import csv
import json

import pytest
import torch

from resnet_lab.ablation.cli import main as ablate_main
from resnet_lab.ablation.runner import batches, build_datamodule, load_checkpoint
from resnet_lab.ablation.study import UserError

from .test_studies import write_checkpoint

ARGS = ["--limit", "96", "--batch-size", "32", "--no-progress"]


@torch.no_grad()
def naive_error(ck, removed: list[str], limit: int) -> tuple[int, int]:
    """(wrong, n) of one full forward per batch with `removed` taken out of the net."""
    dm = build_datamodule(ck.data)
    dm.setup("test")
    wrong = n = 0
    with ck.model.remove_blocks(removed):
        for x, y in batches(dm, "test", limit):
            wrong += int((ck.model(x).argmax(1) != y).sum())
            n += len(y)
    return wrong, n


@pytest.mark.parametrize("name", ["resnet14", "preact_resnet14", "plain14"])
def test_every_run_of_adjacent_blocks_equals_a_forward_without_it(tmp_path, name):
    path = write_checkpoint(tmp_path / name / "net.ckpt", name)
    out = tmp_path / "rep"
    assert ablate_main([path, "--out", str(out), "--studies", "adjacent", "--adjacent-max", "3", *ARGS]) == 0
    with open(out / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["study"] == "adjacent"]
    ck = load_checkpoint(path)
    names = ck.model.block_names  # 6 blocks: 6 + 5 + 4 runs
    assert [(int(r["run_length"]), r["first_block"]) for r in rows] == [
        (n, names[i]) for n in (1, 2, 3) for i in range(len(names) - n + 1)
    ]
    for r in rows:
        i = names.index(r["first_block"])
        removed = names[i : i + int(r["run_length"])]
        assert r["removed"] == "+".join(removed)
        assert r["downsample"] == str(any(b in ck.model.downsample_blocks for b in removed))
        assert (int(r["wrong"]), int(r["n"])) == naive_error(ck, removed, 96), r["key"]


def test_report_sets_adjacent_beside_random_blocks_and_resumes(tmp_path):
    cks = [write_checkpoint(tmp_path / n / "net.ckpt", n) for n in ("resnet14", "plain14")]
    out = tmp_path / "rep"
    args = [*cks, "--out", str(out), "--studies", "k", "adjacent", "--k-max", "2", "--adjacent-max", "2", *ARGS]
    assert ablate_main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    section = md.split("## Adjacent blocks removed")[1].split("\n## ")[0]
    table = [ln.split(" | ") for ln in section.splitlines() if ln.startswith("| ") and "checkpoint" not in ln]
    assert len(table) == 2 * 2  # two nets, L = 1 and 2
    for ck in {r["checkpoint"] for r in rows}:
        for length in (1, 2):
            ours = [r["error"] for r in rows if r["study"] == "adjacent" and r["checkpoint"] == ck
                    and r["run_length"] == length]  # fmt: skip
            rnd = [r["error"] for r in rows if r["study"] == "k" and r["checkpoint"] == ck and r["k"] == length]
            line = next(t for t in table if t[0] == f"| {ck} [eval-bn]" and t[1] == str(length))
            assert line[2] == str(len(ours)) and line[3].startswith(f"{sum(ours) / len(ours):.2f} ± ")
            assert line[6].strip(" |") == f"{sum(ours) / len(ours) - sum(rnd) / len(rnd):+.2f}"
    assert (out / "adjacent.png").exists()
    before = (out / "results.jsonl").read_text()
    assert ablate_main(args) == 0
    assert (out / "results.jsonl").read_text() == before  # every unit resumed, nothing recomputed


def test_adjacent_max_beyond_the_blocks_is_one_error(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "n" / "net.ckpt", "resnet14")
    code = ablate_main([path, "--out", str(tmp_path / "o"), "--studies", "adjacent", "--adjacent-max", "7", *ARGS])
    assert code == 2
    assert "adjacent_max 7 exceeds the 6 removable blocks of resnet14; lower --adjacent-max" in capsys.readouterr().err
    with pytest.raises(UserError, match="adjacent_max=0 must be an integer >= 1"):
        from resnet_lab.ablation.studies import StudyOptions

        StudyOptions(adjacent_max=0)
