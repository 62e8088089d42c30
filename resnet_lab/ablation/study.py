"""The study plug-in interface: one question asked of every checkpoint.

A study is one module in `resnet_lab/ablation/studies/`, registered once in that
package's `__init__`. It owns its options (a frozen dataclass of `option` fields, checked
once with the run's), its units of work (`run(ctx)`, with the per-checkpoint context of
context.py: typed options, resumable units, BN modes, seeded samples, the checkpoint's
loss, weights to perturb), its result rows, its `lesion/*` scalar summary, its report sections and plots, and how its
rows pool across checkpoints of one architecture. Everything else (the `ablate` flags,
the manifest, the W&B config, the sweep's `ablation.*` keys, the report) is derived
from the registry, so adding a study touches its module, its registration line, its
tests and the README.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import SEED_MAX, UserError, is_seed

if TYPE_CHECKING:
    from ..models import ResNetSpec
    from .context import Context

SPLITS = ("val", "test")


class AblationError(UserError, RuntimeError):
    """Bad ablation input; the message says how to fix it."""


# -- options ------------------------------------------------------------------------
# Kinds: "count" (an integer >= 1), "count?" (the same, or None), "seed" (errors.is_seed), "float" (a finite
# number), "float>0" (a finite number > 0), "choice" (one of `choices`), "names" (a list of
# strings, or None), "studies" (registered study names). A study's Options is a frozen
# dataclass of such fields; the run's StudyOptions (studies/__init__.py) composes them all
# and checks every field once, so a study's `options(opts)` is already checked.
def option(default: Any, help: str, kind: str = "count", choices: Sequence[str] = (), metavar: str | None = None):
    """A study option: its default, its `ablate --flag` help, and how it is checked."""
    meta = {"help": help, "kind": kind, "choices": tuple(choices), "metavar": metavar}
    return field(default=default, metadata=meta)


def check_fields(opts: Any) -> None:
    """Check (and normalise: lists become tuples) every `option` field of a frozen dataclass."""
    for f in fields(opts):
        v, kind = getattr(opts, f.name), f.metadata.get("kind")
        if kind in ("count", "count?"):
            if (v is not None or kind == "count") and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise AblationError(f"{f.name}={v!r} must be an integer >= 1" + (" (or null)" if v is None else ""))
        elif kind == "seed" and not is_seed(v):
            raise AblationError(f"{f.name}={v!r} must be an integer from 0 to {SEED_MAX} (a seed)")
        elif kind in ("float", "float>0"):
            real = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not real or (kind == "float>0" and v <= 0):
                raise AblationError(f"{f.name}={v!r} must be a finite number" + (" > 0" if kind == "float>0" else ""))
            object.__setattr__(opts, f.name, float(v))
        elif kind == "choice" and isinstance(v, bool) and set(f.metadata["choices"]) == {"off", "on"}:
            object.__setattr__(opts, f.name, "on" if v else "off")  # YAML 1.1 reads a bare on/off as a bool
        elif kind == "choice" and v not in f.metadata["choices"]:
            raise AblationError(f"{f.name}={v!r}: use one of {', '.join(f.metadata['choices'])}")
        elif kind in ("names", "studies"):
            if v is None and kind == "names":
                continue
            if isinstance(v, str) or not isinstance(v, list | tuple) or not all(isinstance(s, str) for s in v):
                example = ", ".join(f.metadata["choices"][:2]) or "a, b"
                raise AblationError(f"{f.name}={v!r} must be a list of names, e.g. [{example}]")
            object.__setattr__(opts, f.name, tuple(v))
            unknown = [s for s in v if s not in f.metadata["choices"]] if kind == "studies" else []
            if not v or unknown:
                raise AblationError(f"unknown {f.name} {unknown or list(v)}; valid: {', '.join(f.metadata['choices'])}")


def check_at_most_blocks(name: str, specs: Sequence[ResNetSpec], options: Any, common: Common) -> None:
    """Refuse a count option `name` (e.g. k_max) above the removable blocks of any net."""
    value = getattr(options, name)
    for spec in specs:
        n = len(set(common.blocks)) if common.blocks else spec.num_blocks
        if value > n:
            raise AblationError(
                f"{name} {value} exceeds the {n} removable blocks of {spec.name}; lower --{name.replace('_', '-')} "
                f"(in a sweep: ablation.{name})"
            )


@dataclass(frozen=True)
class Common:
    """The options every study shares (the runner's, and the random draws')."""

    split: str = option("test", "the split to evaluate on", kind="choice", choices=SPLITS)
    blocks: tuple[str, ...] | None = option(
        None, "removable blocks of the lesion studies (default: all; see model.block_names)", "names", metavar="NAME"
    )
    samples: int = option(10, "random draws per level: block subsets, permutations, routings")
    seed: int = option(0, "seed of every random draw", kind="seed")
    limit: int | None = option(None, "use only the first N images of the split", kind="count?", metavar="N")


def common_of(opts: Any) -> Common:
    """The common options out of the flat (already checked) options of a run."""
    return Common(**{f.name: getattr(opts, f.name) for f in fields(Common)})


@dataclass(frozen=True)
class NoOptions:
    """A study without options of its own."""


# -- report pieces ------------------------------------------------------------------
Table = tuple[list[str], list[list[str]]]  # (head, body); an empty head: nothing to show


@dataclass
class Section:
    """One part of the report, rendered alike as Markdown and HTML."""

    title: str
    notes: list[str] = field(default_factory=list)  # paragraphs before the table
    table: Table | None = None
    after: list[str] = field(default_factory=list)  # paragraphs after the table
    items: list[str] = field(default_factory=list)  # a bullet list of literal (code) lines
    images: list[str] = field(default_factory=list)  # PNG file names beside the report


@dataclass(frozen=True)
class Measure:
    """What a study's pooled value is: the report's tables, CSV and plots follow it."""

    label: str  # e.g. "top-1 error (%)", "cosine"
    digits: int = 2  # decimals shown
    chance: bool = False  # a top-1 error: plots draw the chance line


ERROR = Measure("top-1 error (%)", 2, chance=True)


def as_specs(nets: Sequence[Any]) -> list[Any]:
    """Specs, from specs or from a report's checkpoint entries ({"spec": {...}})."""
    from ..models import spec_from_dict

    return [spec_from_dict(n["spec"]) if isinstance(n, dict) else n for n in nets]


def without_batchnorm(nets: Sequence[Any]) -> list[str]:
    """Names of the nets (specs or checkpoint entries) with no BatchNorm (a ViT, a ConvNeXt:
    nothing to re-estimate)."""
    return list(dict.fromkeys(s.name for s in as_specs(nets) if not s.BATCHNORM))


def refuse_without_any_batchnorm(specs: Sequence[Any], asked: str, sweep_key: str) -> None:
    """A BN re-estimation asked of nets none of which has BatchNorm would do nothing: refused."""
    if specs and not any(s.BATCHNORM for s in specs):
        names = ", ".join(without_batchnorm(specs))
        raise AblationError(f"{asked}: none of these nets has BatchNorm ({names}): there are no statistics to "
                            f"re-estimate; leave it out (in a sweep: {sweep_key})")  # fmt: skip


def chance_error(num_classes: int) -> float:
    """Top-1 error (%) of a uniform guess over `num_classes` classes."""
    return 100.0 * (1 - 1 / num_classes)


def plot_along_depth(ax, agg: list[dict], colour: str, label: str, **labels: str) -> bool:
    """One architecture's pooled values in order, mean ± std over checkpoints, against their
    position as a fraction of the depth (nets of different depths share the axis)."""
    if not agg:
        return False
    x = [j / max(1, len(agg) - 1) for j in range(len(agg))]
    ax.errorbar(x, [a["mean"] for a in agg], [a["std"] for a in agg], fmt="o-", ms=3, capsize=2,
                color=colour, label=label)  # fmt: skip
    ax.set(**labels)
    return True


def position_rows(rows: list[dict], positions: Sequence[int], cell) -> list[list[str]]:
    """A per-block table's body: for each position, its number, every checkpoint's block there
    (joined by " / ": nets of other families name it differently; a row not `applicable` names
    none) and each checkpoint's `cell(row)`, "-" where that net has no such position."""
    cks = list(dict.fromkeys(r["checkpoint"] for r in rows))
    by = {(r["checkpoint"], r["position"]): r for r in rows}
    body = []
    for p in positions:
        cells, names = [], {}
        for ck in cks:
            r = by.get((ck, p))
            cells.append("-" if r is None else cell(r))
            if r is not None and r.get("applicable", True):
                names[r["block"] + (" (downsample)" if r["downsample"] else "")] = None
        body.append([str(p), " / ".join(names) or "-", *cells])
    return body


def save_figure(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# -- the interface --------------------------------------------------------------------
class Study:
    """One question asked of each checkpoint. Subclasses set the class attributes and
    override what they produce; the defaults produce nothing."""

    name: ClassVar[str]
    default: ClassVar[bool] = False  # run when `--studies` is not given
    Options: ClassVar[type] = NoOptions  # its own options (flat names, unique across studies)
    metrics: ClassVar[dict[str, str]] = {}  # lesion/<name> summaries -> what each means

    def options(self, opts: Any) -> Any:
        """This study's typed options out of the flat (already checked) options of a run."""
        return self.Options(**{f.name: getattr(opts, f.name) for f in fields(self.Options)})

    def mine(self, rows: list[dict]) -> list[dict]:
        return [r for r in rows if r["study"] == self.name]

    def check(self, specs: Sequence[ResNetSpec], options: Any, common: Common) -> None:
        """Refuse, before anything is evaluated, options (its own, and the common ones) these
        networks cannot serve."""

    def check_model(self, model: Any, options: Any, common: Common) -> None:
        """Refuse, before anything is evaluated, options this loaded network cannot serve
        (e.g. block names it does not have)."""

    def data_notes(self, options: Any, common: Common, n_split: int) -> list[str]:
        """Notes on how the options meet the data (printed by `ablate`), e.g. a count cut to the split."""
        return []

    def run(self, ctx: Context) -> None:
        """Compute this study's unfinished units of one checkpoint (context.py) into the store."""
        raise NotImplementedError

    def complete(self, rows: list[dict]) -> list[dict]:
        """All rows, with this study's derived rows (re)computed from its stored ones."""
        return rows

    def summary(self, rows: list[dict]) -> dict[str, float]:
        """`lesion/*` scalars of one checkpoint's eval-BN rows."""
        return {}

    def produces(self, metric: str) -> bool:
        """Whether `summary` can hold lesion/`metric`."""
        return metric in self.metrics

    def pooled(self, row: dict) -> list[tuple[str, float]]:
        """(key, value) pairs under which one of its rows pools across checkpoints."""
        return []

    def measure(self, key: str) -> Measure:
        """What the pooled value under `key` is (default: a top-1 error in %)."""
        return ERROR

    def sections(self, rows: list[dict], meta: dict[str, Any]) -> list[Section]:
        return []

    def plot(self, rows: list[dict], out: Path, colour: dict[str, str], num_classes: int) -> str | None:
        """One PNG of its rows under `out`; returns the file name (None: nothing to draw)."""
        return None

    def plot_pooled(self, ax, agg: list[dict], colour: str, label: str) -> bool:
        """Draw one architecture's pooled rows (mean ± std over checkpoints); False: none."""
        return False
