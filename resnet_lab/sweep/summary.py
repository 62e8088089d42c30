"""`resnet-lab sweep --summary`: per-cell statistics over seeds, and the depth comparisons
(the plots are in plots.py).

A cell is one setting of every swept parameter except the seed (`seed_everything`). A run
counts once per cell and seed: a sampler that draws a cell again (random, TPE) with the same
seed repeats an experiment, it adds no sample; the first completed trial stands for it and
the summary names the repeats.
Each cell's row states how many completed runs it stands on (n) and gives, as mean ± std
(min, max) over them:
  - test/error: the final weights' test error (what He et al. report);
  - train/error_end: the final training error, the mean per-batch training error
    (augmented batches) over the last 10% of iterations, read from the run's
    csv/metrics.csv (Lightning's train/error is a whole-epoch mean);
  - best_test/error: the test error of the checkpoint selected by val/error, labelled
    apart (selected on val, never on test).
Written to cells.csv / cells.md beside trials.json and the plots.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..ablation.stats import Difference, depth_family, mean_spread, welch
from ..callbacks import read_history
from ..models import paper_error, spec_from_dict
from ..trainer_checks import run_seed
from .space import SEED_KEY

STATS = ("test/error", "train/error_end", "best_test/error", "val/error")


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        spec = t.user_attrs.get("spec") or {}
        net = spec_from_dict(spec) if spec else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                **t.params,
                "depth": net and net.depth,
                "plain": net and net.plain,
                "shortcut": spec.get("shortcut"),
                "net": net and net.name,
                "family": depth_family(spec) if spec else None,
                "run_dir": t.user_attrs.get("run_dir"),
                "seed": t.params[SEED_KEY] if SEED_KEY in t.params else run_seed(t.user_attrs.get("run_dir")),
                **{k: v for k, v in t.user_attrs.items() if "/" in k and isinstance(v, int | float)},
            }
        )
        end = final_train_error(rows[-1]["run_dir"]) if t.state == TrialState.COMPLETE else None
        if end is not None:
            rows[-1]["train/error_end"] = end
        rows[-1]["budget"] = training_budget(rows[-1]["run_dir"])
        paper = paper_error(net) if net else None
        rows[-1]["paper"] = paper.label() if paper else None
    return rows


def training_budget(run_dir: str | None) -> str | None:
    """'1,900 iterations' (or epochs) from the config Lightning saved in the run directory."""
    path = Path(run_dir or "") / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    t = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
    if (t.get("max_steps") or -1) > 0:
        return f"{t['max_steps']:,} iterations"
    return f"{t['max_epochs']} epochs" if (t.get("max_epochs") or -1) > 0 else None


def final_train_error(run_dir: str | None, fraction: float = 0.1) -> float | None:
    """Mean logged per-batch training error over the last `fraction` of iterations."""
    points = read_curves(run_dir)["train/error_step"]
    if not points:
        return None
    last = max(s for s, _ in points)
    tail = [v for s, v in points if s >= last * (1 - fraction)]
    return statistics.fmean(tail)


def cell_params(rows: list[dict]) -> list[str]:
    """The swept parameters that define a cell: every param but the seed."""
    keys = {k for r in rows for k in r if "." in k or k == SEED_KEY}
    return sorted(k for k in keys if k != SEED_KEY and "/" not in k)


def _by_cell_and_seed(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Completed trials grouped by cell and seed, each group in trial order. An unknown seed
    (None: the run folder is gone) is one group: such runs are never counted as new samples."""
    keys = cell_params(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["number"]):
        if r["state"] == "COMPLETE":
            groups[(*(r.get(k) for k in keys), r.get("seed"))].append(r)
    return groups


def independent(rows: list[dict]) -> list[dict]:
    """One completed trial per cell and seed (the first): the runs that are samples."""
    return [rs[0] for rs in _by_cell_and_seed(rows).values()]


def repeats(rows: list[dict]) -> list[str]:
    """'trials 3, 4 repeat trial 2 (model.depth=56, seed 0)': the runs `independent` leaves out."""
    keys = cell_params(rows)
    out = []
    for rs in _by_cell_and_seed(rows).values():
        if len(rs) > 1:
            first, again = rs[0], [str(r["number"]) for r in rs[1:]]
            seed = "unknown (its run folder is gone)" if first.get("seed") is None else first["seed"]
            where = ", ".join([*(f"{k}={first.get(k)}" for k in keys), f"seed {seed}"])
            verb = "repeats" if len(again) == 1 else "repeat"
            out.append(f"trial{'s' * (len(again) > 1)} {', '.join(again)} {verb} trial {first['number']} ({where})")
    return out


REPEATS_NOTE = (
    "Counted once (the same cell and seed trained again: a repeat of one experiment, not a new sample; "
    "the first completed trial stands for it): "
)


def describe(values: list[float]) -> dict[str, float]:
    """n, mean, sample std (None for one run: it has no spread), min, max."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def cells(rows: list[dict]) -> list[dict[str, Any]]:
    """One entry per cell of completed trials: its params, n, and `describe` of each stat."""
    keys = cell_params(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in independent(rows):
        groups[tuple(r.get(k) for k in keys)].append(r)
    out = []

    def order(kv):  # numbers numerically, everything else as text
        return [(0, v, "") if isinstance(v, int | float) else (1, 0, str(v)) for v in kv[0]]

    for vals, rs in sorted(groups.items(), key=order):
        seeds = sorted((r["seed"] for r in rs), key=lambda x: (x is None, x or 0))
        cell: dict[str, Any] = {**dict(zip(keys, vals)), "n": len(rs), "seeds": seeds}
        for k in ("budget", "paper"):  # one value per cell unless its runs differ (then all, in order)
            cell[k] = " / ".join(sorted({r[k] for r in rs if r.get(k)})) or None
        for stat in STATS:
            v = [r[stat] for r in rs if stat in r]
            if v:
                cell[stat] = describe(v)
        out.append(cell)
    return out


def _fmt(d: dict[str, float] | None) -> str:
    if not d:
        return "-"
    if d["n"] < 2:
        return mean_spread(d["mean"], None, d["n"])
    return mean_spread(d["mean"], d["std"], d["n"], f" ({d['min']:.2f}, {d['max']:.2f})")


def cell_table(cs: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = cell_params([{k: 1 for k in c if "." in k} for c in cs]) if cs else []
    head = [
        *keys,
        "n",
        "seeds",
        "final test/error",
        "train error, last 10% of iterations",
        "best-by-val test/error",
        "this run's budget",
        "paper's test error (source; the paper's budget)",
    ]
    body = [
        [
            *[str(c.get(k)) for k in keys],
            str(c["n"]),
            seeds_text(c["seeds"]),
            _fmt(c.get("test/error")),
            _fmt(c.get("train/error_end")),
            _fmt(c.get("best_test/error")),
            c.get("budget") or "-",
            c.get("paper") or "none reported for this net",
        ]
        for c in cs
    ]
    return head, body


def seeds_text(seeds: list[int | None]) -> str:
    """'0, 1, 2'; a run whose seed is unknown (its run folder is gone) shows as '?'."""
    return ", ".join("?" if s is None else str(s) for s in seeds)


def write_cells(cs: list[dict], out: Path) -> str:
    head, body = cell_table(cs)
    keys = head[: head.index("n")]
    with open(out / "cells.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "n", "seeds", "test_error_mean", "test_error_std", "test_error_min", "test_error_max",
                    "train_error_mean", "train_error_std", "best_test_error_mean", "best_test_error_std", "budget",
                    "paper_test_error"])  # fmt: skip
        for c in cs:
            t, tr, b = c.get("test/error") or {}, c.get("train/error_end") or {}, c.get("best_test/error") or {}
            w.writerow(
                [
                    *[c.get(k) for k in keys],
                    c["n"],
                    seeds_text(c["seeds"]),
                    t.get("mean"),
                    t.get("std"),
                    t.get("min"),
                    t.get("max"),
                    tr.get("mean"),
                    tr.get("std"),
                    b.get("mean"),
                    b.get("std"),
                    c.get("budget"),
                    c.get("paper"),
                ]  # fmt: skip
            )
    md = [
        "Errors in %, mean ± sample std (min, max) over the n completed runs of each cell, one per seed (listed).",
        "Final = the weights at the end of training. Train error = the mean per-batch training error (augmented",
        "batches) over the last 10% of iterations. Best-by-val = the checkpoint with the lowest val/error,",
        "selected on the validation split; its test error is reported apart. The paper's number is for the",
        "registered net of that name only (a variant gets none), trained on the paper's budget, not this run's.",
        "",
        *markdown_table(head, body),
    ]
    (out / "cells.md").write_text("\n".join(md) + "\n")
    return text_table(head, body)


DEPTH_KEYS = ("model.depth", "model.arch")


def depth_comparisons(rows: list[dict]) -> list[dict[str, Any]]:
    """Deeper minus shallowest within each setting of the other swept parameters (and the
    same architecture but for depth): Welch intervals of final test and training error."""
    done = [r for r in independent(rows) if r.get("family") and "test/error" in r]
    others = [k for k in cell_params(done) if k not in DEPTH_KEYS]
    groups: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in done:
        groups[(r["family"], *(r.get(k) for k in others))][r["depth"]].append(r)
    out = []
    for key, by_depth in groups.items():
        depths = sorted(by_depth)
        base = by_depth[depths[0]]
        setting = ", ".join(f"{k}={v}" for k, v in zip(others, key[1:]))
        for d in depths[1:]:
            deep = by_depth[d]
            row: dict[str, Any] = {"comparison": f"{deep[0]['net']} − {base[0]['net']}", "setting": setting}
            for stat in ("test/error", "train/error_end"):
                a, b = [r[stat] for r in base if stat in r], [r[stat] for r in deep if stat in r]
                if a and b:
                    row[stat] = welch(a, b)
            out.append(row)
    return sorted(out, key=lambda r: (r["setting"], r["comparison"]))


def no_depth_comparison(rows: list[dict]) -> str:
    """Why `depth_comparisons` found nothing to compare."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get("family") and "test/error" in r]
    depths = sorted({r["depth"] for r in done})
    if not depths:
        return "no completed trial with a test error yet"
    if len(depths) == 1:
        return f"the study has one depth ({depths[0]}); sweep model.depth over two or more to compare depths"
    return f"no two depths {depths} share a setting of the other swept parameters and an architecture"


def _diff(d: Difference | None) -> str:
    return "-" if d is None else f"{d.mean:+.2f} {d.interval()}"


def depth_table(comps: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["comparison", "setting", "n (deep/shallow)", "Δ test error [95% CI]", "Δ train error [95% CI]", "verdict"]
    body = []
    for c in comps:
        t, tr = c["test/error"], c.get("train/error_end")
        train = (
            ""
            if tr is None
            else "; "
            + (
                tr.verdict("deeper trains better", "deeper trains worse")
                if tr.resolved
                else "training error not resolved"
            )
        )
        body.append(
            [
                c["comparison"],
                c["setting"] or "-",
                f"{t.n_b}/{t.n_a}",
                _diff(t),
                _diff(tr),
                t.verdict("deeper is better", "deeper is worse") + train,
            ]
        )
    return head, body


DEPTH_NOTE = (
    "Deeper minus shallower, in points of error (%): negative = the deeper net errs less. Intervals: 95% Welch t "
    "intervals over the seeds of each side (unequal variances, Welch-Satterthwaite degrees of freedom). A "
    "verdict is given only where the interval excludes 0; otherwise the difference is not resolved at this n."
)


def write_depth_comparisons(comps: list[dict], out: Path) -> str:
    """depth_differences.csv and a Markdown section appended to cells.md; returns the text table."""
    with open(out / "depth_differences.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["comparison", "setting", "stat", "n_deep", "n_shallow", "mean_difference", "ci95_lo", "ci95_hi",
                    "welch_df"])  # fmt: skip
        for c in comps:
            for stat in ("test/error", "train/error_end"):
                d = c.get(stat)
                if d is not None:
                    w.writerow([c["comparison"], c["setting"], stat, d.n_b, d.n_a, d.mean, d.lo, d.hi, d.df])
    head, body = depth_table(comps)
    md = ["", "## Depth comparisons", "", DEPTH_NOTE, "", *markdown_table(head, body)]
    with open(out / "cells.md", "a") as f:
        f.write("\n".join(md) + "\n")
    return text_table(head, body)


def markdown_table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in body]]


def text_table(head: list[str], body: list[list[str]]) -> str:
    """Columns padded to their widest cell, for the terminal."""
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in [head, *body])


def read_curves(run_dir: str | None) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of a run's csv/metrics.csv: train/error_step and val/error."""
    return read_history(run_dir, ("train/error_step", "val/error"))


def print_table(rows: list[dict], metric: str) -> str:
    cols = ["number", "state", "value", *sorted({k for r in rows for k in r} - {"number", "state", "value"})]
    keep = [
        c
        for c in cols
        if c in ("number", "state", "value", SEED_KEY)
        or "." in c
        or c in (metric, "train/error_end", "test/error", "val/error", "best_test/error")
        or c.startswith("lesion/")
    ]

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v))

    return text_table(keep, [[fmt(r.get(c)) for c in keep] for r in rows])


def summarize(study: optuna.Study, out: Path, metric: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    (out / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
    cs = cells(rows)
    (out / "cells.json").write_text(json.dumps(cs, indent=1, default=str))
    text = "Trials:\n" + print_table(rows, metric)
    text += "\n\nCells (mean ± std (min, max) over the n completed seeds):\n" + write_cells(cs, out)
    again = repeats(rows)
    if again:
        text += "\n" + REPEATS_NOTE + "; ".join(again) + "."
        with open(out / "cells.md", "a") as f:
            f.write("\n" + REPEATS_NOTE + "; ".join(again) + ".\n")
    comps = depth_comparisons(rows)
    if comps:
        text += "\n\nDepth comparisons (deeper − shallowest; 95% Welch t intervals over seeds):\n"
        text += write_depth_comparisons(comps, out)
    else:
        why = no_depth_comparison(rows)
        text += f"\n\nDepth comparisons: none: {why}"
        with open(out / "cells.md", "a") as f:
            f.write(f"\n## Depth comparisons\n\nNone: {why}.\n")
    from .plots import plot

    plots = plot(rows, cs, out)
    counts = {s.name: sum(r["state"] == s.name for r in rows) for s in TrialState}
    text += "\n\n" + ", ".join(f"{k.lower()} {v}" for k, v in counts.items() if v)
    tables = [out / "cells.csv", out / "cells.md", *([out / "depth_differences.csv"] if comps else [])]
    text += "\ntables: " + ", ".join(map(str, tables))
    text += "\nplots: " + (", ".join(plots) if plots else "none (no completed trials with a depth)")
    return text
