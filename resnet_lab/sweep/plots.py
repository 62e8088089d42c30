"""The plots of `resnet-lab sweep --summary`: error against depth (He et al. Table 6 as a
curve), the shortcut comparison, each lesion summary against depth, and the training curves
(He et al. Fig. 6). Lines are drawn per architecture (the spec without its depth) and setting
of every other swept parameter: pre- and post-activation, plain and residual nets of one depth,
or two learning rates, are never one line; what a line pools are the seeds of its cells, one
run per seed (`summary.independent`)."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

from ..ablation.study import save_figure
from .summary import DEPTH_KEYS, cell_params, describe, independent, read_curves


def _series_label(c: dict, skip: tuple[str, ...]) -> str:
    keys = [k for k in cell_params([{k: 1 for k in c if "." in k}]) if k not in skip]
    return ", ".join(f"{k.split('.')[-1]}={c[k]}" for k in keys)


def plot(rows: list[dict], cs: list[dict], out: Path) -> list[str]:
    """Every plot the study's trials allow; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    made = [p for p in (_plot_error_vs_depth(cs, out), _plot_shortcuts(cs, out)) if p]
    made += plot_lesions(rows, out)
    made += plot_training_curves(rows, out)
    return made


def _save(fig, path: Path) -> str:
    return str(path.parent / save_figure(fig, path))


def arch_label(net: str | None) -> str:
    """A net's architecture without its depth: resnet56 -> resnet, preact_resnet110 -> preact_resnet."""
    return re.sub(r"\d+", "", net or "") or "net"


def _by_arch(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by architecture (the spec without its depth), labelled by its nets' name."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["family"]].append(r)
    labels = {fam: arch_label(rs[0]["net"]) for fam, rs in groups.items()}
    twice = {lb for lb in labels.values() if list(labels.values()).count(lb) > 1}
    return {
        (f"{labels[fam]} ({i})" if labels[fam] in twice else labels[fam]): rs
        for i, (fam, rs) in enumerate(sorted(groups.items()))
    }


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """One run per cell and seed, with a depth, grouped by architecture and the setting of every
    other swept parameter: 'resnet, optimizer.lr=0.1'."""
    done = [r for r in independent(rows) if r.get("family") and r.get("depth") is not None]
    others = [k for k in cell_params(done) if k not in DEPTH_KEYS]
    out: dict[str, list[dict]] = defaultdict(list)
    for label, rs in _by_arch(done).items():
        for r in rs:
            out[", ".join([label, *(f"{k}={r.get(k)}" for k in others)])].append(r)
    return out


def _plot_error_vs_depth(cs: list[dict], out: Path) -> str | None:
    """Error vs depth with error bars (std over seeds); one line per setting of every other
    swept parameter, so cells never overwrite each other."""
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = defaultdict(list)
    for c in cs:
        if "model.depth" in c and "test/error" in c:
            series[_series_label(c, ("model.depth",))].append(c)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, cl) in enumerate(sorted(series.items())):
        cl = sorted(cl, key=lambda c: c["model.depth"])
        d = [c["model.depth"] for c in cl]
        for stat, style in (("test/error", "o-"), ("train/error_end", "s--")):
            if all(stat in c for c in cl):
                ax.errorbar(
                    d,
                    [c[stat]["mean"] for c in cl],
                    yerr=[c[stat]["std"] or 0.0 for c in cl],
                    fmt=style,
                    color=f"C{i}",
                    capsize=3,
                    label=f"{label or 'all'} {stat.split('/')[0]} (n={min(c['n'] for c in cl)})",
                )
    ax.set(xlabel="depth", ylabel="error (%)", title="Final error vs depth (mean ± std over seeds)")
    ax.legend(fontsize=7)
    return _save(fig, out / "error_vs_depth.png")


def _plot_shortcuts(cs: list[dict], out: Path) -> str | None:
    import matplotlib.pyplot as plt

    cl = [c for c in cs if "model.shortcut" in c and "test/error" in c]
    if len(cl) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [_series_label(c, ()) for c in cl]
    ax.bar(range(len(cl)), [c["test/error"]["mean"] for c in cl], yerr=[c["test/error"]["std"] or 0.0 for c in cl],
           color="tab:green", capsize=3)  # fmt: skip
    ax.set_xticks(range(len(cl)), labels, rotation=30, fontsize=7)
    ax.set(ylabel="test error (%)", title="Shortcut comparison (mean ± std over seeds)")
    return _save(fig, out / "shortcuts.png")


def plot_lesions(rows: list[dict], out: Path) -> list[str]:
    """Each lesion/ summary the trials hold against depth, one line per architecture; what the
    value measures comes from the study that produces it (the registry)."""
    import matplotlib.pyplot as plt

    from ..ablation.studies import REGISTRY

    metrics = sorted({k for r in rows if r["state"] == "COMPLETE" for k in r if k.startswith("lesion/")})
    made = []
    for metric in metrics:
        name = metric.split("/", 1)[1]
        owner = REGISTRY.metric_owner(name)
        groups = _series([r for r in rows if metric in r])
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (label, rs) in enumerate(sorted(groups.items())):
            pts: dict[int, list[float]] = defaultdict(list)
            for r in rs:
                pts[r["depth"]].append(r[metric])
            d = sorted(pts)
            stats = [describe(pts[x]) for x in d]
            n = min(len(pts[x]) for x in d)
            ax.errorbar(d, [s["mean"] for s in stats], yerr=[s["std"] or 0.0 for s in stats], fmt="o-", capsize=3,
                        color=f"C{i}", label=f"{label} (n={n})")  # fmt: skip
        what = owner.metrics.get(name, metric) if owner else metric
        ax.set(xlabel="depth", ylabel=name, title=f"{what} (mean ± std over seeds)"[:90])
        ax.legend(fontsize=8)
        made.append(_save(fig, out / f"{name}_vs_depth.png"))
    return made


def _smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Moving average of per-batch values over `window` logged points."""
    out, acc = [], []
    for s, v in points:
        acc.append(v)
        acc = acc[-window:]
        out.append((s, statistics.fmean(acc)))
    return out


def plot_training_curves(rows: list[dict], out: Path) -> list[str]:
    """He et al. Fig. 6: training error (thin) and validation error (bold) vs iterations,
    one panel per family (plain, residual), one colour per depth; the line is the mean
    over seeds, the band spans min..max over seeds."""
    import matplotlib.pyplot as plt
    import numpy as np

    runs: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for label, rs in _series([r for r in rows if r.get("run_dir")]).items():
        for r in rs:
            curves = read_curves(r["run_dir"])
            if curves["train/error_step"]:
                runs[(label, r["depth"])].append(curves)
    if not runs:
        return []
    families = sorted({a for a, _ in runs})
    depths = sorted({d for _, d in runs})
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.2), sharey=True, squeeze=False)
    for ax, arch in zip(axes[0], families):
        for i, depth in enumerate(depths):
            series = runs.get((arch, depth), [])
            for key, lw, smooth in (("train/error_step", 0.8, 10), ("val/error", 2.2, 1)):
                curves = [_smooth(s[key], smooth) for s in series if s[key]]
                if not curves:
                    continue
                steps = sorted(set.intersection(*[{p for p, _ in c} for c in curves]))
                if not steps:
                    continue
                vals = np.array([[dict(c)[p] for p in steps] for c in curves])
                label = f"{arch}-{depth} {'train' if key.startswith('train') else 'val'}"
                ax.plot(steps, vals.mean(0), lw=lw, color=f"C{i}", label=f"{label} (n={len(curves)})")
                if len(curves) > 1:
                    ax.fill_between(steps, vals.min(0), vals.max(0), color=f"C{i}", alpha=0.15, lw=0)
        ax.set(xlabel="iterations", ylabel="error (%)", title=f"{arch} nets")
        ax.legend(fontsize=7)
    fig.suptitle("Training (thin) and validation (bold) error, mean over seeds, band = min..max (He et al. Fig. 6)")
    return [_save(fig, out / "training_curves.png")]
