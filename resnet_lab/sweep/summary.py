"""`resnet-lab sweep --summary`: a table of trials and the paper-style plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import optuna
from optuna.trial import TrialState


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        spec = t.user_attrs.get("spec") or {}
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                **t.params,
                "depth": spec.get("depth"),
                "plain": spec.get("plain"),
                "shortcut": spec.get("shortcut"),
                **{k: v for k, v in t.user_attrs.items() if "/" in k and isinstance(v, int | float)},
            }
        )
    return rows


def print_table(rows: list[dict], metric: str) -> str:
    cols = ["number", "state", "value", *sorted({k for r in rows for k in r} - {"number", "state", "value"})]
    keep = [
        c
        for c in cols
        if c in ("number", "state", "value")
        or "." in c
        or c in (metric, "train/error", "test/error", "val/error")
        or c.startswith("lesion/")
    ]

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v))

    table = [keep] + [[fmt(r.get(c)) for c in keep] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keep))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table)


def plot(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "COMPLETE" and r.get("depth") is not None]
    made = []
    series: dict[tuple[bool, str], dict[int, float]] = defaultdict(dict)
    for r in done:
        for split in ("train/error", "test/error"):
            if split in r:
                series[(bool(r["plain"]), split)][r["depth"]] = r[split]
    if series:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (plain, split), pts in sorted(series.items()):
            d = sorted(pts)
            ax.plot(
                d,
                [pts[x] for x in d],
                "o-" if split == "test/error" else "o--",
                color="tab:red" if plain else "tab:blue",
                label=f"{'plain' if plain else 'resnet'} {split.split('/')[0]}",
            )
        ax.set(xlabel="depth", ylabel="error (%)", title="Error vs depth (He et al. Fig. 6 style)")
        ax.legend(fontsize=8)
        made.append(_save(fig, out / "error_vs_depth.png"))
    shortcuts: dict[str, list[float]] = defaultdict(list)
    for r in done:
        if r.get("shortcut") and not r.get("plain") and "test/error" in r:
            shortcuts[r["shortcut"]].append(r["test/error"])
    if len(shortcuts) > 1:
        fig, ax = plt.subplots(figsize=(4, 3.5))
        keys = sorted(shortcuts)
        ax.bar(keys, [sum(shortcuts[k]) / len(shortcuts[k]) for k in keys], color="tab:green")
        ax.set(xlabel="shortcut option", ylabel="test error (%)", title="Shortcut comparison")
        made.append(_save(fig, out / "shortcuts.png"))
    lesion: dict[bool, dict[int, float]] = defaultdict(dict)
    for r in done:
        if "lesion/mean_single_error" in r:
            lesion[bool(r["plain"])][r["depth"]] = r["lesion/mean_single_error"]
    if lesion:
        fig, ax = plt.subplots(figsize=(6, 4))
        for plain, pts in sorted(lesion.items()):
            d = sorted(pts)
            ax.plot(
                d,
                [pts[x] for x in d],
                "o-",
                color="tab:red" if plain else "tab:blue",
                label="plain" if plain else "resnet",
            )
        ax.set(xlabel="depth", ylabel="mean error, one block removed (%)", title="Lesion summary vs depth")
        ax.legend(fontsize=8)
        made.append(_save(fig, out / "lesion_vs_depth.png"))
    return made


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def summarize(study: optuna.Study, out: Path, metric: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    (out / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
    text = print_table(rows, metric)
    plots = plot(rows, out)
    counts = {s.name: sum(r["state"] == s.name for r in rows) for s in TrialState}
    text += "\n\n" + ", ".join(f"{k.lower()} {v}" for k, v in counts.items() if v)
    text += "\nplots: " + (", ".join(plots) if plots else "none (no completed trials with a depth)")
    return text
