"""Turn ablation rows into CSV/JSON tables, PNG plots, report.md and a self-contained
report.html. The studies (studies/) give their sections, plots and summaries; this
module orders them and adds what spans studies: the checkpoints, and the pooling of
checkpoints of one architecture."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .render import markdown, page
from .runner import INIT_BN_IMAGES
from .stats import across_checkpoints, samples
from .studies import REGISTRY
from .study import Section, as_specs, chance_error, save_figure, without_batchnorm

__all__ = ["chance_error", "complete", "lesion_summary", "write_report"]

SEEDS_PLOT = "across_seeds.png"


def complete(rows: list[dict]) -> list[dict]:
    """The stored rows with every study's derived rows (re)computed (idempotent)."""
    for study in REGISTRY:
        rows = study.complete(rows)
    return rows


def lesion_summary(rows: list[dict], checkpoint: str | None = None) -> dict[str, float]:
    """Scalar `lesion/*` summaries of one checkpoint's eval-BN rows (all rows if None),
    each study's own (see each study's `metrics`)."""
    rows = [r for r in rows if r["condition"] == "eval-bn" and checkpoint in (None, r["checkpoint"])]
    out: dict[str, float] = {}
    for study in REGISTRY:
        out.update(study.summary(rows))
    return out


def pooled(row: dict) -> list[tuple[str, float]]:
    return REGISTRY[row["study"]].pooled(row) if row["study"] in REGISTRY.names else []


def write_tables(rows: list[dict], out: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


def write_seed_table(agg: list[dict], out: Path) -> None:
    """results_by_arch.csv: the across-checkpoint aggregates (empty with one checkpoint per arch)."""
    keys = ["arch", "condition", "study", "key", "measure", "n_checkpoints", "not_finite", "mean", "std", "min", "max"]
    with open(out / "results_by_arch.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({**a, "measure": REGISTRY[a["study"]].measure(a["key"]).label} for a in agg)


def seeds_table(agg: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Mean ± std over checkpoints of one architecture, eval-BN rows."""
    if not agg:
        return [], []
    order = {"intact": 0, "mean over blocks": 1}
    study_order = {name: i for i, name in enumerate(REGISTRY.names)}
    agg = sorted(
        (a for a in agg if a["condition"] == "eval-bn"),
        key=lambda a: (a["arch"], study_order.get(a["study"], 99), order.get(a["key"], 2), a["key"]),
    )
    body = []
    for a in agg:
        m = REGISTRY[a["study"]].measure(a["key"])
        d = m.digits
        spread = f"{a['mean']:.{d}f} ± {a['std']:.{d}f} ({a['min']:.{d}f}, {a['max']:.{d}f})"
        if a["not_finite"]:
            spread = f"not finite ({a['not_finite']} of {a['n_checkpoints']} checkpoints)"
        body.append([a["arch"], a["study"], a["key"], m.label, str(a["n_checkpoints"]), spread])
    return ["architecture", "study", "condition", "measure", "checkpoints", "mean ± std (min, max)"], body


def plot_all(rows: list[dict], agg: list[dict], out: Path, num_classes: int) -> dict[str, str]:
    """One PNG per study that has something to draw, and the pooled one: {name: file}."""
    import matplotlib

    matplotlib.use("Agg")
    colour = checkpoint_colours(list(dict.fromkeys(r["checkpoint"] for r in rows)))
    made = {}
    for study in REGISTRY:
        name = study.plot(rows, out, colour, num_classes)
        if name:
            made[study.name] = name
    name = _plot_seeds([a for a in agg if a["condition"] == "eval-bn"], out / SEEDS_PLOT, num_classes)
    if name:
        made["seeds"] = name
    return made


def checkpoint_colours(labels: list[str]) -> dict[str, Any]:
    """One colour per checkpoint across all plots, in command-line order: the default cycle
    up to 10 checkpoints, then tab20 (the default cycle repeats after 10), then a
    continuous colormap."""
    import matplotlib

    if len(labels) <= 10:
        return {ck: f"C{i}" for i, ck in enumerate(labels)}
    if len(labels) <= 20:
        return {ck: matplotlib.colormaps["tab20"](i) for i, ck in enumerate(labels)}  # an int: the i-th colour
    turbo = matplotlib.colormaps["turbo"]
    return {ck: turbo(i / (len(labels) - 1)) for i, ck in enumerate(labels)}


def _plot_seeds(agg: list[dict], path: Path, num_classes: int) -> str | None:
    """Per architecture, each study's pooled rows: mean ± std over checkpoints."""
    studies = [s for s in REGISTRY if any(a["study"] == s.name for a in agg)]
    if not studies:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4), squeeze=False)
    drawn = False
    for ax, study in zip(axes[0], studies):
        its_rows = [a for a in agg if a["study"] == study.name]
        for i, arch in enumerate(sorted({a["arch"] for a in agg})):
            mine = [a for a in agg if a["arch"] == arch]
            n = max(a["n_checkpoints"] for a in mine)
            ours = [a for a in mine if a["study"] == study.name]
            drawn |= bool(ours) and study.plot_pooled(ax, ours, f"C{i}", f"{arch} (n={n})")
        if its_rows and all(study.measure(a["key"]).chance for a in its_rows):
            ax.axhline(chance_error(num_classes), color="gray", ls=":", lw=1, label=f"chance ({num_classes} classes)")
        if ax.get_legend_handles_labels()[0]:  # a study without a pooled plot leaves its axes empty
            ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    return save_figure(fig, path)


def bn_line(checkpoints: list[dict]) -> str:
    """What BN the nets evaluate with: a ViT or ConvNeXt has none."""
    lacking = [s for s in as_specs(checkpoints) if not s.BATCHNORM]
    if not lacking:
        return "BN: trained running statistics (eval mode)."
    if len(lacking) == len(checkpoints):
        return "No BatchNorm in these nets."
    names = without_batchnorm(lacking)
    return (f"BN (in {len(checkpoints) - len(lacking)} of {len(checkpoints)} nets; {', '.join(names)} "
            f"{'has' if len(names) == 1 else 'have'} none): trained running statistics (eval mode).")  # fmt: skip


def bn_settled(checkpoint: dict) -> str:
    return f", BN statistics of {INIT_BN_IMAGES:,} training images" if as_specs([checkpoint])[0].BATCHNORM else ""


def sections(rows: list[dict], agg: list[dict], meta: dict[str, Any], plots: dict[str, str]) -> list[Section]:
    ck_lines = [
        f"{c['label']}: {c['path']}; spec {json.dumps(c['spec'])}; "
        + (f"untrained (init:{bn_settled(c)})" if c.get("init") else "training: "
           + ", ".join([*(s for s in c.get("sample", []) if s.startswith("seed ")),
                        *(f"{k} {v:g}" for k, v in c["train_metrics"].items())]))
        for c in meta["checkpoints"]
    ]  # fmt: skip
    out = [Section("Checkpoints", items=ck_lines)]
    for study in REGISTRY.selected(meta["options"]["studies"]):
        out += study.sections(rows, meta)
    st = seeds_table(agg)
    seeds_note = (
        "Each checkpoint's row set is kept in results.csv. Here, checkpoints of one architecture (e.g. one per "
        "seed) are pooled: the spread between independently trained networks, one checkpoint per training run "
        "(a run's best-by-val checkpoints and untrained nets pool apart). Rows of random draws (the "
        "k-subsets) are first averaged within each checkpoint."
    )
    notes = (
        [seeds_note]
        if st[0]
        else ["Fewer than two independent runs of any architecture (of one recipe): nothing to pool."]
    )
    repeats = samples(meta["checkpoints"])[1]
    if repeats:  # here and in every interval across seeds
        notes.append("Left out of every pooled value and interval: " + " ".join(repeats))
    out.append(Section("Across checkpoints of one architecture (mean ± std over seeds)", notes, st if st[0] else None))
    out.append(Section("Plots", images=list(plots.values()), after=["Full results: `results.csv`, `results.json`."]))
    return out


def report_title(studies) -> str:
    """The report is of the studies it ran, whichever they are."""
    return f"resnet-lab ablate report: {', '.join(studies)}"


def write_report(rows: list[dict], out: Path, meta: dict[str, Any]) -> dict[str, str]:
    """results.csv/json, results_by_arch.csv, plots, report.md and report.html (images
    inlined), from completed rows (`complete`). Returns the plots, {name: file}."""
    write_tables(rows, out)
    agg = across_checkpoints(rows, pooled, samples(meta["checkpoints"])[0])  # one per training run, by architecture
    write_seed_table(agg, out)
    meta = {**meta, "num_classes": meta["checkpoints"][0]["spec"]["num_classes"]}
    plots = plot_all(rows, agg, out, meta["num_classes"])
    preface = [
        f"Command: `{meta['command']}`",
        f"Split: **{meta['split']}** ({meta['n_images']} images). {bn_line(meta['checkpoints'])}",
    ]
    if meta.get("devices"):  # which device computed how many of the stored units (a resumed run can mix them)
        preface.append(
            "Computed on: "
            + ", ".join(f"{d} ({n} unit{'s' * (n != 1)})" for d, n in meta["devices"].items())
            + (" in float32 without TF32." if any(d != "cpu" for d in meta["devices"]) else ".")
        )
    secs = sections(rows, agg, meta, plots)
    title = report_title(meta["options"]["studies"])
    (out / "report.md").write_text(markdown(title, preface, secs))
    (out / "report.html").write_text(page(title, preface, secs, out))
    return plots
