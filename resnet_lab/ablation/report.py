"""Turn ablation rows into CSV/JSON tables, PNG plots, report.md and a self-contained report.html."""

from __future__ import annotations

import base64
import csv
import html
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .paths import with_shares
from .stats import across_checkpoints, mean_spread

PLOTS = {
    "seeds": "across_seeds.png",
    "single": "single_block.png",
    "k": "k_lesion.png",
    "reorder": "reorder.png",
    "responses": "responses.png",
    "paths": "paths.png",
}


def _mean_std(v: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Tables keyed by study: per-block errors, k curve (mean±std), reorder (tau, error)."""
    out: dict[str, Any] = {
        "single": defaultdict(list),
        "k": defaultdict(dict),
        "reorder": defaultdict(list),
        "responses": defaultdict(list),
        "baseline": {},
    }
    kvals: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        tag = (r["checkpoint"], r["condition"])
        if r["study"] == "single":
            if r["key"] == "intact":
                out["baseline"][r["checkpoint"]] = r["error"]
            else:
                out["single"][tag].append(r)
        elif r["study"] == "k":
            kvals[(r["checkpoint"], r["condition"], r["k"])].append(r["error"])
        elif r["study"] == "reorder":
            out["reorder"][tag].append(r)
        elif r["study"] == "responses":
            out["responses"][r["checkpoint"]].append(r)
    for (ck, cond, k), errs in sorted(kvals.items()):
        out["k"][(ck, cond)][k] = _mean_std(errs) + (len(errs),)
    return out


def lesion_summary(rows: list[dict], checkpoint: str | None = None) -> dict[str, float]:
    """Scalar summaries of one checkpoint's eval-BN rows (all rows if None):
    lesion/intact_error, mean/max single-block error, lesion/k{k}_error and
    lesion/kmax_error (the largest k run); with the paths study, lesion/paths_range_lo/hi
    (the effective path range) and lesion/paths_path_share (its share of all paths)."""
    rows = [r for r in rows if r["condition"] == "eval-bn" and checkpoint in (None, r["checkpoint"])]
    out: dict[str, float] = {}
    drops = []
    for r in rows:
        if r["study"] == "single":
            if r["key"] == "intact":
                out["lesion/intact_error"] = r["error"]
            else:
                drops.append(r["error"])
    if drops:
        out["lesion/mean_single_error"] = statistics.fmean(drops)
        out["lesion/max_single_error"] = max(drops)
    for k in sorted({r["k"] for r in rows if r["study"] == "k"}):
        out[f"lesion/k{k}_error"] = out["lesion/kmax_error"] = statistics.fmean(
            r["error"] for r in rows if r["study"] == "k" and r["k"] == k
        )
    for r in rows:
        if r["study"] == "paths" and r["key"] == "effective range":
            out["lesion/paths_range_lo"], out["lesion/paths_range_hi"] = r["range_lo"], r["range_hi"]
            out["lesion/paths_path_share"] = r["range_path_share"]
    return out


def write_seed_table(agg: list[dict], out: Path) -> None:
    """results_by_arch.csv: the across-checkpoint aggregates (empty with one checkpoint per arch)."""
    keys = ["arch", "condition", "study", "key", "n_checkpoints", "error_mean", "error_std", "error_min", "error_max"]
    with open(out / "results_by_arch.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(agg)


def complete_paths(rows: list[dict]) -> list[dict]:
    """Each checkpoint's path-length rows with (c) total_share and its effective-range
    row (derived here, from the stored measurements; idempotent); other rows unchanged."""
    out, by_ck = [], defaultdict(list)
    for r in rows:
        if r["study"] == "paths" and r["key"] == "effective range":
            continue  # derived: recomputed below
        if r["study"] == "paths" and r.get("applicable"):
            by_ck[r["checkpoint"]].append(r)
        else:
            out.append(r)
    for rs in by_ck.values():
        out += with_shares(rs)
    order = {ck: i for i, ck in enumerate(dict.fromkeys(r["checkpoint"] for r in rows))}
    return sorted(out, key=lambda r: order[r["checkpoint"]])  # stable: each checkpoint's rows in stored order


def paths_by_checkpoint(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """{checkpoint: {"lengths": [k rows], "range": row}} or {"na": reason} for plain nets."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["study"] != "paths":
            continue
        d = out.setdefault(r["checkpoint"], {"lengths": []})
        if not r.get("applicable"):
            d["na"] = r["reason"]
        elif r["key"] == "effective range":
            d["range"] = r
        else:
            d["lengths"].append(r)
    return out


def paths_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    by = paths_by_checkpoint(rows)
    if not by:
        return [], []
    head = ["checkpoint", "blocks n", "measurements per length", "effective range (k)", "gradient share",
            "share of all paths"]  # fmt: skip
    body = []
    for ck, d in by.items():
        if "na" in d:
            body.append([ck, "-", "-", f"not applicable ({d['na']})", "-", "-"])
            continue
        r = d["range"]
        body.append(
            [
                ck,
                str(r["n_blocks"]),
                f"{r['grad_n']} ({r['grad_n'] // r['images']} routings x {r['images']} images)",
                f"{r['range_lo']}–{r['range_hi']}",
                f"{100 * r['range_gradient_share']:.1f}%",
                f"{100 * r['range_path_share']:.3g}%",
            ]
        )
    return head, body


def _plot_paths(path: Path, by: dict[str, dict[str, Any]], colour: dict) -> str:
    """Veit et al. Fig. 6 (a) path-length distribution, (b) gradient magnitude per
    length, (c) total gradient per length with the effective range shaded."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ck, d in by.items():
        if "na" in d:
            continue
        rs = sorted(d["lengths"], key=lambda r: r["k"])
        ks = [r["k"] for r in rs]
        axes[0].plot(ks, [r["path_fraction"] for r in rs], "-", color=colour[ck], label=ck)
        axes[1].semilogy(ks, [r["grad_mean"] for r in rs], "o-", ms=2, color=colour[ck], label=ck)
        axes[2].plot(ks, [r["total_share"] for r in rs], "-", color=colour[ck], label=ck)
        lo, hi = d["range"]["range_lo"], d["range"]["range_hi"]
        axes[2].axvspan(lo, hi, color=colour[ck], alpha=0.12)
    axes[0].set(xlabel="path length k", ylabel="fraction of paths", title="(a) distribution of path lengths")
    axes[1].set(xlabel="path length k", ylabel="mean ||dL/dh0|| (log)", title="(b) gradient magnitude per path")
    axes[2].set(xlabel="path length k", ylabel="share of total gradient",
                title="(c) total gradient per length (shaded: 90% range)")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
    return _save(fig, path)


def write_tables(rows: list[dict], out: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


def chance_error(num_classes: int) -> float:
    """Top-1 error (%) of a uniform guess over `num_classes` classes."""
    return 100.0 * (1 - 1 / num_classes)


def plot_all(rows: list[dict], out: Path, num_classes: int) -> list[str]:
    """One PNG per study that has rows; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    s = summarize(rows)
    # One colour per checkpoint across all plots, in command-line order.
    colour = {ck: f"C{i}" for i, ck in enumerate(dict.fromkeys(r["checkpoint"] for r in rows))}
    plots = (
        ("single", lambda ax: _plot_single(ax, s, colour, num_classes), (9, 4)),
        ("k", lambda ax: _plot_k(ax, s, colour), (6, 4)),
        ("reorder", lambda ax: _plot_reorder(ax, s, colour), (6, 4)),
        ("responses", lambda ax: _plot_responses(ax, s, colour), (7, 4)),
    )
    import matplotlib.pyplot as plt

    made = []
    for study, draw, size in plots:
        if s[study]:
            fig, ax = plt.subplots(figsize=size)
            draw(ax)
            made.append(_save(fig, out / PLOTS[study]))
    by = paths_by_checkpoint(rows)
    if any("na" not in d for d in by.values()):
        made.append(_plot_paths(out / PLOTS["paths"], by, colour))
    agg = [a for a in across_checkpoints(rows) if a["condition"] == "eval-bn"]
    if agg:
        made.append(_plot_seeds(agg, out / PLOTS["seeds"], num_classes))
    return made


def _plot_seeds(agg: list[dict], path: Path, num_classes: int) -> str:
    """Per architecture: single-block and k-lesion error, mean ± std over checkpoints."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arch in enumerate(sorted({a["arch"] for a in agg})):
        mine = [a for a in agg if a["arch"] == arch]
        n = max(a["n_checkpoints"] for a in mine)
        single = [a for a in mine if a["study"] == "single" and a["key"].startswith("drop:")]
        if single:  # nets of different depths share the axis: position as a fraction of the depth
            x = [j / max(1, len(single) - 1) for j in range(len(single))]
            a1.errorbar(x, [a["error_mean"] for a in single], [a["error_std"] for a in single],
                        fmt="o-", ms=3, capsize=2, color=f"C{i}", label=f"{arch} (n={n})")  # fmt: skip
        ks = sorted((a for a in mine if a["study"] == "k"), key=lambda a: int(a["key"][2:]))
        if ks:
            a2.errorbar([int(a["key"][2:]) for a in ks], [a["error_mean"] for a in ks], [a["error_std"] for a in ks],
                        fmt="o-", capsize=3, color=f"C{i}", label=f"{arch} (n={n})")  # fmt: skip
    for ax in (a1, a2):
        ax.axhline(chance_error(num_classes), color="gray", ls=":", lw=1, label=f"chance ({num_classes} classes)")
        ax.legend(fontsize=7)
    a1.set(
        xlabel="position of the removed block (0 = first, 1 = last)",
        ylabel="error (%)",
        title="One block removed: mean ± std over checkpoints",
    )
    a2.xaxis.get_major_locator().set_params(integer=True)
    a2.set(xlabel="blocks removed (k)", ylabel="error (%)", title="k random blocks: mean ± std over checkpoints")
    return _save(fig, path)


def _plot_single(ax, s: dict, colour: dict, num_classes: int) -> None:
    for (ck, cond), rs in s["single"].items():
        rs = sorted(rs, key=lambda r: r["position"])
        (line,) = ax.plot(
            [r["position"] for r in rs],
            [r["error"] for r in rs],
            "o-" if cond == "eval-bn" else "s:",
            color=colour[ck],
            label=f"{ck} [{cond}]",
        )
        down = [r for r in rs if r["downsample"]]
        ax.scatter(
            [r["position"] for r in down],
            [r["error"] for r in down],
            s=140,
            facecolors="none",
            edgecolors=line.get_color(),
            linewidths=1.5,
        )
        if ck in s["baseline"]:
            ax.axhline(s["baseline"][ck], color=line.get_color(), ls="--", lw=1)
    ax.axhline(chance_error(num_classes), color="gray", ls=":", lw=1, label=f"chance ({num_classes} classes)")
    # Name the ticks only where every net's block at that position has the same name
    # (nets of different depths, or --blocks subsets, would otherwise be mislabelled).
    at: dict[int, set[str]] = defaultdict(set)
    for rs in s["single"].values():
        for r in rs:
            at[r["position"]].add(r["block"])
    if all(len(v) == 1 for v in at.values()):
        ax.set_xticks(sorted(at), [next(iter(at[p])) for p in sorted(at)], rotation=60, fontsize=7)
    else:
        ax.set_xlabel("position of the removed block (forward order; the nets differ in depth)")
    ax.set(ylabel="error (%)", title="Error with one block removed (dashed: intact; circled: downsampling)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plot_k(ax, s: dict, colour: dict) -> None:
    for (ck, cond), curve in s["k"].items():
        ks = sorted(curve)
        m = [curve[k][0] for k in ks]
        sd = [curve[k][1] or 0.0 for k in ks]
        ax.plot(ks, m, "o-", color=colour[ck], label=f"{ck} [{cond}]")
        ax.fill_between(ks, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2, color=colour[ck])
    ax.set(xlabel="blocks removed (k)", ylabel="error (%)", title="Random k-block lesions (mean ± std)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)


def _plot_reorder(ax, s: dict, colour: dict) -> None:
    for (ck, cond), rs in s["reorder"].items():
        ax.scatter([r["tau"] for r in rs], [r["error"] for r in rs], s=12, color=colour[ck], label=f"{ck} [{cond}]")
    ax.set(xlabel="Kendall tau to the original order", ylabel="error (%)", title="Error vs block reordering")
    ax.invert_xaxis()
    ax.legend(fontsize=7)


def _plot_responses(ax, s: dict, colour: dict) -> None:
    for ck, rs in s["responses"].items():
        rs = sorted(rs, key=lambda r: r["layer_index"])
        ax.plot([r["layer_index"] for r in rs], [r["std"] for r in rs], "o-", ms=3, color=colour[ck], label=ck)
    ax.set(xlabel="3x3 layer index", ylabel="std of response", title="Layer responses (after BN, He et al. Fig. 7)")
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def single_block_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows: baseline, then each block; one error column per checkpoint (eval-BN)."""
    s = summarize(rows)
    cols = [ck for (ck, cond) in s["single"] if cond == "eval-bn"]
    if not cols:
        return [], []
    per = {ck: {r["block"]: r for r in s["single"][(ck, "eval-bn")]} for ck in cols}
    names = [r["block"] for r in sorted(s["single"][(cols[0], "eval-bn")], key=lambda r: r["position"])]
    intact = {r["checkpoint"]: r for r in rows if r["study"] == "single" and r["key"] == "intact"}
    body = [["intact (baseline)", *[_err(intact.get(ck)) for ck in cols]]]
    for n in names:
        r0 = per[cols[0]][n]
        mark = " (downsample)" if r0["downsample"] else ""
        if r0.get("removed_as", "identity") != "identity":
            mark += f" → {r0['removed_as']}"
        body.append([f"drop {n}{mark}", *[_err(per[ck].get(n)) for ck in cols]])
    return ["condition", *cols], body


def _err(r: dict | None) -> str:
    """Error with its 95% Wilson interval over the evaluated images."""
    if r is None:
        return "-"
    if "error_ci_lo" not in r:
        return f"{r['error']:.2f}"
    return f"{r['error']:.2f} [{r['error_ci_lo']:.1f}, {r['error_ci_hi']:.1f}]"


def seeds_table(agg: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Mean ± std over checkpoints of one architecture, eval-BN rows."""
    if not agg:
        return [], []
    order = {"intact": 0, "mean over blocks": 1}
    agg = sorted(
        (a for a in agg if a["condition"] == "eval-bn"),
        key=lambda a: (a["arch"], a["study"] != "single", order.get(a["key"], 2), a["key"]),
    )
    body = [
        [
            a["arch"],
            a["study"],
            a["key"],
            str(a["n_checkpoints"]),
            f"{a['error_mean']:.2f} ± {a['error_std']:.2f} ({a['error_min']:.2f}, {a['error_max']:.2f})",
        ]  # fmt: skip
        for a in agg
    ]
    return ["architecture", "study", "condition", "checkpoints", "error % mean ± std (min, max)"], body


def k_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    s = summarize(rows)
    series = list(s["k"])
    if not series:
        return [], []
    ks = sorted({k for c in s["k"].values() for k in c})
    head = ["k", *[f"{ck} [{cond}]" for ck, cond in series]]
    body = [[str(k), *[mean_spread(*s["k"][t][k]) if k in s["k"][t] else "-" for t in series]] for k in ks]
    return head, body


def _md_table(head: list[str], body: list[list[str]]) -> str:
    if not head:
        return "_not run_\n"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _html_table(head: list[str], body: list[list[str]]) -> str:
    if not head:
        return "<p><em>not run</em></p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{th}</tr>{trs}</table>"


def write_report(rows: list[dict], out: Path, meta: dict[str, Any]) -> None:
    """results.csv/json, plots, report.md and report.html (images inlined), from rows
    whose paths study is completed (`complete_paths`)."""
    write_tables(rows, out)
    num_classes = meta["checkpoints"][0]["spec"]["num_classes"]
    plots = plot_all(rows, out, num_classes)
    kept = sorted({r["removed_as"] for r in rows if r.get("removed_as") not in (None, "-", "identity")})
    preact = {c["spec"].get("preact", False) for c in meta["checkpoints"]}
    merge = {frozenset([False]): "relu(shortcut(x))", frozenset([True]): "shortcut(x)"}.get(
        frozenset(preact), "relu(shortcut(x)) (post-activation) or shortcut(x) (pre-activation)"
    )
    removal = (
        f"A removed block computes y = {merge}: y = x where its shortcut is the identity"
        + (
            f"; where it is not, its shortcut is kept ({', '.join(kept)}), so that removal is not y = x."
            if kept
            else "."
        )
        + f" Chance error: {chance_error(num_classes):.2f}% ({num_classes} classes)."
    )
    sb, kt, pt = single_block_table(rows), k_table(rows), paths_table(rows)
    pm = meta.get("paths") or {}
    paths_note = (
        "Veit et al. Sec. 5: the forward pass is intact; in the backward pass, k randomly sampled blocks pass "
        "the gradient through their residual branch and the rest through their skip. Per length k = 0..n, "
        f"{pm.get('samples')} random routings on each of {pm.get('images')} images (seed {pm.get('seed')}), "
        "mean ||dL/dh0|| at the input of the first block. Total gradient per length = fraction of paths x "
        "mean magnitude, normalised; the effective range is the shortest window of lengths holding at least "
        "90% of it. Plain nets have one path and are not applicable."
    )
    agg = across_checkpoints(rows)
    write_seed_table(agg, out)
    st = seeds_table(agg)
    seeds_note = (
        "Each checkpoint's row set is kept in results.csv. Here, checkpoints of one architecture (e.g. one per "
        "seed) are pooled: the spread between independently trained networks. k rows are first averaged over "
        "their random subsets within each checkpoint."
    )
    ck_lines = [
        f"- `{c['label']}`: `{c['path']}`; spec `{json.dumps(c['spec'])}`; training: "
        + ", ".join(f"{k} {v:g}" for k, v in c["train_metrics"].items())
        for c in meta["checkpoints"]
    ]
    md = [
        "# Test-time lesion report\n",
        f"Command: `{meta['command']}`\n",
        f"Split: **{meta['split']}** ({meta['n_images']} images). BN: trained running statistics (eval mode)"
        + (
            f"; 'recalibrated-bn' rows re-estimate BN on {meta['bn_recalib']} training images."
            if meta["bn_recalib"]
            else "."
        )
        + "\n",
        "## Checkpoints\n",
        *ck_lines,
        "",
        "## Single-block removal (top-1 error, %)\n",
        removal + "\n",
        _md_table(*sb),
        "Brackets: 95% Wilson interval of each error over the evaluated images (the sampling error of one "
        "evaluation, not the spread between training runs).\n",
        "## Random k-block removal (error %, mean ± std over samples)\n",
        _md_table(*kt),
        *(["## Path lengths and the gradient (Veit et al. Fig. 6)\n", paths_note + "\n", _md_table(*pt)] * bool(pt[0])),
        "## Across checkpoints of one architecture (mean ± std over seeds)\n",
        seeds_note + "\n" if st[0] else "",
        _md_table(*st) if st[0] else "_fewer than two checkpoints of any architecture_\n",
        "## Plots\n",
        *[f"![{p}]({p})\n" for p in plots],
        "Full results: `results.csv`, `results.json`.\n",
    ]
    (out / "report.md").write_text("\n".join(md))
    imgs = "".join(
        f'<h3>{html.escape(p)}</h3><img alt="{html.escape(p)}" src="data:image/png;base64,'
        f'{base64.b64encode((out / p).read_bytes()).decode()}"/>'
        for p in plots
    )
    paths_html = (
        f"<h2>Path lengths and the gradient (Veit et al. Fig. 6)</h2><p>{html.escape(paths_note)}</p>"
        + _html_table(*pt)
        if pt[0]
        else ""
    )
    cks = "".join(f"<li><code>{html.escape(line[2:])}</code></li>" for line in ck_lines)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>resnet-lab lesion report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>Test-time lesion report</h1><p>Command: <code>{html.escape(meta["command"])}</code></p>
<p>Split: <b>{html.escape(meta["split"])}</b> ({meta["n_images"]} images)</p>
<h2>Checkpoints</h2><ul>{cks}</ul>
<h2>Single-block removal (top-1 error, %)</h2><p>{html.escape(removal)}</p>{_html_table(*sb)}
<p>Brackets: 95% Wilson interval over the evaluated images.</p>
<h2>Random k-block removal (error %, mean ± std)</h2>{_html_table(*kt)}
{paths_html}
<h2>Across checkpoints of one architecture (mean ± std over seeds)</h2>
<p>{html.escape(seeds_note)}</p>{_html_table(*st)}
<h2>Plots</h2>{imgs}</body></html>"""
    (out / "report.html").write_text(page)
