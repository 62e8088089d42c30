"""The `sweep:` section of an experiment file: search space, sampler, objective, storage.

    sweep:
      study_name: depth
      sampler: grid                # grid | random | tpe
      metric: test/error           # any logged metric, or a lesion summary (lesion/...)
      direction: minimize
      n_trials: null               # grid: every cell; random/tpe: required
      storage: null                # default sqlite:///<root>/<study_name>/study.db
      root: runs/sweeps
      pruner: null                 # {class_path: optuna.pruners.MedianPruner, init_args: {...}}
      ablation: null               # {studies: [single, k], k_max: 3, samples: 5, split: test, limit: null}
      seeds: [0, 1, 2]             # grid: every cell once per seed (summaries: mean ± std over seeds)
      overrides:                   # fit options for the cells that match `when` (the paper's ResNet-110 warm-up)
        - {when: {model.depth: 110}, set: {lr_scheduler.init_args.warmup_lr: 0.01}}
      space:
        model.depth: [20, 32, 44, 56, 110]        # a list: categorical (grid cells)
        model.plain: [false, true]
        optimizer.init_args.lr: {low: 0.01, high: 0.3, log: true}   # a range (random/tpe)
        ablation.k_max: [1, 3]                    # test-time parameters: no retraining

Keys under `ablation.` are test-time removal parameters; every other key is a dotted
`resnet-lab fit` option, checked against the real fit parser.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import optuna

from ..errors import UserError, is_seed, not_a_seed

SEED_KEY = "seed_everything"
STAGES = ("train", "val", "test", "best_test")  # fit's metric prefixes (best_test: the best-by-val checkpoint)
FIT_METRICS = ("error", "error5", "acc", "acc5", "loss")


def ablation_keys() -> tuple[str, ...]:
    """The test-time options (`sweep.ablation` keys, `ablation.*` space keys): the ablate CLI's."""
    return tuple(ablation_defaults())


def ablation_defaults() -> dict[str, Any]:
    """A trial's test-time ablation: these defaults (the ablate CLI's), then sweep.ablation,
    then the cell's ablation.* values."""
    from ..ablation.studies import defaults

    return defaults()


class SweepError(UserError, ValueError):
    """Bad sweep configuration; the message names the fix."""


@dataclass
class SweepSpec:
    study_name: str
    space: dict[str, Any]
    sampler: str = "grid"
    metric: str = "test/error"
    direction: str = "minimize"
    n_trials: int | None = None
    storage: str | None = None
    root: str = "runs/sweeps"
    pruner: dict[str, Any] | None = None
    ablation: dict[str, Any] | None = None
    seed: int = 0
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 2
    threads: int | None = None  # torch threads per trial; None: CPU cores // workers on this machine
    seeds: list[int] | None = None  # repeat every grid cell once per seed (seed_everything)
    overrides: list[dict[str, Any]] | None = None  # [{when: {param: value}, set: {fit option: value}}]
    allow_test_objective: bool = False  # let a selecting sampler or pruner optimise a test/ metric
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SweepSpec:
        if not d:
            raise SweepError("the config has no `sweep:` section; add one (see sweeps/depth.yaml)")
        d = dict(d)
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = set(d) - known
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
            raise SweepError(f"unknown sweep option(s) {sorted(unknown)}; did you mean {hints}? valid: {sorted(known)}")
        if not d.get("study_name"):
            raise SweepError("sweep.study_name is required")
        for name, kind, what in (
            ("space", dict, "a mapping of option: [values] or {low, high}"),
            ("ablation", dict, "a mapping of ablation option: value"),
            ("overrides", list, "a list of {when: {...}, set: {...}} rules"),
            ("seeds", list, "a list of integers"),
            ("pruner", dict, "{class_path: ..., init_args: {...}}"),
        ):
            if d.get(name) is not None and not isinstance(d[name], kind):
                raise SweepError(f"sweep.{name} must be {what}; got {type(d[name]).__name__} {d[name]!r:.80}")
        spec = cls(**d)
        spec.validate()
        if spec.seeds:
            spec.space = {**spec.space, SEED_KEY: list(spec.seeds)}
        return spec

    def validate(self) -> None:
        if not self.space:
            raise SweepError("sweep.space is empty: give at least one parameter, e.g. `model.depth: [20, 32]`")
        if self.sampler not in ("grid", "random", "tpe"):
            raise SweepError(f"unknown sampler {self.sampler!r}; valid: grid, random, tpe")
        if self.direction not in ("minimize", "maximize"):
            raise SweepError(f"direction must be minimize or maximize, got {self.direction!r}")
        for k, v in self.space.items():
            if isinstance(v, list):
                if not v:
                    raise SweepError(f"sweep.space.{k} is an empty list")
                _check_once(f"sweep.space.{k}", v)
            elif isinstance(v, dict):
                if self.sampler == "grid":
                    raise SweepError(f"sweep.space.{k} is a range; a grid needs a list of values")
                _check_range(k, v)
            else:
                raise SweepError(f"sweep.space.{k} must be a list of values or a {{low, high}} range, got {v!r}")
            keys = ablation_keys()
            if k.startswith("ablation.") and k.split(".", 1)[1] not in keys:
                close = difflib.get_close_matches(k.split(".", 1)[1], keys, n=2)
                raise SweepError(f"unknown test-time parameter {k!r}; close: {close}; valid: {list(keys)}")
        if self.sampler != "grid" and not self.n_trials:
            raise SweepError(f"sweep.n_trials is required with the {self.sampler} sampler")
        for name in ("n_trials", "threads", "heartbeat_interval", "grace_period"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise SweepError(f"sweep.{name}={v!r} must be a positive integer")
        selects = self.sampler != "grid" or bool(self.pruner)
        if selects and self.on_test_split() and not self.allow_test_objective:
            raise SweepError(
                f"sweep.metric {self.metric!r} is measured on the test split, and the {self.sampler} sampler"
                + (" with a pruner" if self.pruner else "")
                + " selects on it: the chosen config would be tuned to the test set. Optimise a val/ metric "
                "(e.g. val/error, or lesion/ metrics with ablation.split: val), use sampler: grid, or set "
                "sweep.allow_test_objective: true to do it knowingly"
            )
        self._check_metric()
        self._check_ablation_options()
        self._check_seeds_and_overrides()
        if self.max_retry < 0:
            raise SweepError(f"sweep.max_retry={self.max_retry} must be >= 0")

    def _check_seeds_and_overrides(self) -> None:
        if self.seeds is not None:
            if self.sampler != "grid":
                raise SweepError(
                    "sweep.seeds repeats the cells of a grid; with random/tpe put seed_everything in the space"
                )
            if SEED_KEY in self.space:
                raise SweepError(f"give the seeds once: sweep.seeds or sweep.space.{SEED_KEY}, not both")
            if not self.seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.seeds):
                raise SweepError(f"sweep.seeds must be a non-empty list of integers, got {self.seeds!r}")
            _check_once("sweep.seeds", self.seeds)
        self._check_seed_values()
        for i, rule in enumerate(self.overrides or []):
            if not isinstance(rule, dict) or set(rule) != {"when", "set"} or not rule["when"] or not rule["set"]:
                raise SweepError(
                    f"sweep.overrides[{i}] must be {{when: {{param: value}}, set: {{option: value}}}}, got {rule!r}"
                )
            clash = [k for k in rule["set"] if k in self.space]
            if clash:
                raise SweepError(f"sweep.overrides[{i}].set changes swept parameters {clash}; sweep them instead")

    def _check_seed_values(self) -> None:
        """The sampler's seed and every training seed (sweep.seeds, the space's seed_everything)
        are seeds of the one range fit takes; a bad one failed each of its trials, or the study."""
        space = self.space.get(SEED_KEY)
        ends = [space["low"], space["high"]] if isinstance(space, dict) else space or []
        for where, values in (("sweep.seed", [self.seed]), ("sweep.seeds", self.seeds or []),
                              (f"sweep.space.{SEED_KEY}", ends)):  # fmt: skip
            bad = [v for v in values if not is_seed(v)]
            if bad:
                raise SweepError(f"{where}: {not_a_seed(bad[0])}")

    def inactive_overrides(self) -> list[tuple[int, list[str]]]:
        """Rules that name parameters this space does not sweep: they match no cell (e.g.
        depth.yaml's ResNet-110 rule under a preset that sweeps only the lr)."""
        out = []
        for i, rule in enumerate(self.overrides or []):
            missing = [k for k in rule["when"] if k not in self.space]
            if missing:
                out.append((i, missing))
        return out

    def cell_overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """The fit options that the `overrides` rules add to a cell with these params."""
        out: dict[str, Any] = {}
        for rule in self.overrides or []:
            if all(params.get(k) == v for k, v in rule["when"].items()):
                out.update(rule["set"])
        return out

    def _check_metric(self) -> None:
        """The objective must be a metric a trial produces: a typo would fail only after training."""
        stage, _, name = self.metric.partition("/")
        if stage == "lesion":
            if not self.ablation and not any(k.startswith("ablation.") for k in self.space):
                raise SweepError(
                    f"sweep.metric {self.metric!r} is a test-time ablation result, but the sweep runs no ablation: "
                    "add sweep.ablation (e.g. {studies: [single, k], k_max: 3}) or ablation.* parameters to the space"
                )
            from ..ablation.studies import REGISTRY

            owner = REGISTRY.metric_owner(name)
            if owner is None:
                names = [m for s in REGISTRY for m in s.metrics]
                close = difflib.get_close_matches(name, names, n=2)
                raise SweepError(
                    f"unknown lesion metric {self.metric!r}; close: {close}; valid: lesion/{{{', '.join(names)}}}"
                )
            study = owner.name
            studies = {s for v in self.ablation_values("studies") for s in v}
            if study not in studies:
                raise SweepError(
                    f"sweep.metric {self.metric!r} comes from the {study!r} ablation study, which this sweep does not "
                    f"run (ablation studies: {sorted(studies)}); add it to sweep.ablation.studies"
                )
            return
        valid = [f"{s}/{m}" for s in STAGES for m in FIT_METRICS]
        if self.metric not in valid:
            close = difflib.get_close_matches(self.metric, valid, n=2)
            raise SweepError(
                f"unknown sweep.metric {self.metric!r}; did you mean {close}? valid: {', '.join(valid)}, lesion/..."
            )

    def ablation_values(self, key: str) -> list[Any]:
        """Every value `key` takes in this sweep's test-time ablations (default, section, space)."""
        swept = self.space.get(f"ablation.{key}")
        if isinstance(swept, list):
            return list(swept)
        return [(self.ablation or {}).get(key, ablation_defaults()[key])]

    def _check_ablation_options(self) -> None:
        """Every test-time option is checked before any trial trains (the ablate CLI's checks)."""
        unknown = set(self.ablation or {}) - set(ablation_keys())
        if unknown:
            raise SweepError(f"unknown sweep.ablation option(s) {sorted(unknown)}; valid: {list(ablation_keys())}")
        if not self.runs_ablation():
            return
        base = {**ablation_defaults(), **(self.ablation or {})}
        for key in ablation_keys():
            for v in self.ablation_values(key):
                self.study_options({**base, key: v}, f"sweep ablation {key}={v!r}")

    def runs_ablation(self) -> bool:
        return bool(self.ablation) or any(k.startswith("ablation.") for k in self.space)

    def study_options(self, values: dict[str, Any], where: str):
        """The ablation's StudyOptions from flat values (defaults filled in), or one SweepError."""
        from ..ablation.studies import StudyOptions
        from ..errors import UserError

        try:
            return StudyOptions(**{**ablation_defaults(), **values})
        except (UserError, TypeError) as e:
            raise SweepError(f"{where}: {e}") from None

    # -- derived ----------------------------------------------------------------
    def on_test_split(self) -> bool:
        """Whether the objective is a test-split number (lesion/ metrics follow ablation.split)."""
        if self.metric.startswith("lesion/"):
            splits = self.space.get("ablation.split") or [(self.ablation or {}).get("split", "test")]
            return "test" in splits
        return self.metric.startswith("test/")

    def grid(self) -> list[dict[str, Any]]:
        keys = list(self.space)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(self.space[k] for k in keys))]

    def space_json(self) -> str:
        return json.dumps(self.space, sort_keys=True)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        params = {}
        for k, v in self.space.items():
            if isinstance(v, list) and self.sampler == "grid" and numeric(v):
                # A grid cell's value is fixed by its enqueued trial. A numeric range (not a
                # categorical) lets `--force` add values later: Optuna forbids changing a
                # categorical's choices within a study.
                lo, hi = min(v), max(v)
                ints = all(isinstance(x, int) for x in v)
                params[k] = trial.suggest_int(k, lo, hi) if ints else trial.suggest_float(k, float(lo), float(hi))
            elif isinstance(v, list):
                params[k] = trial.suggest_categorical(k, v)
            elif v.get("type") == "int" or (
                isinstance(v["low"], int) and isinstance(v["high"], int) and "step" not in v and not v.get("log")
            ):
                params[k] = trial.suggest_int(k, int(v["low"]), int(v["high"]), log=bool(v.get("log")))
            else:
                params[k] = trial.suggest_float(
                    k, float(v["low"]), float(v["high"]), log=bool(v.get("log")), step=v.get("step")
                )
        return params

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=self.seed)
        # grid cells are enqueued explicitly (see run.py); random fills any non-enqueued trial
        return optuna.samplers.RandomSampler(seed=self.seed)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if not self.pruner:
            return optuna.pruners.NopPruner()
        import importlib

        path = self.pruner.get("class_path", "")
        mod, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod or "optuna.pruners"), name)
        except (ImportError, AttributeError) as e:
            raise SweepError(f"unknown pruner {path!r}; e.g. optuna.pruners.MedianPruner") from e
        return cls(**(self.pruner.get("init_args") or {}))


def _check_once(name: str, values: list[Any]) -> None:
    """Each value of a list that defines runs (a grid's cells, seeds) is one run: a repeat would
    silently collapse into one. True and 1 count as different values here."""
    for i, x in enumerate(values):
        if any(x == e and (type(x) is type(e) or numeric([x, e])) for e in values[:i]):
            raise SweepError(f"{name} lists {x!r} twice; give each value once")


def numeric(values: list[Any]) -> bool:
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in values)


def changed_categoricals(old_space: dict[str, Any], spec: SweepSpec) -> list[str]:
    """Parameters whose categorical choices differ from the stored space (Optuna cannot
    change those within a study; numeric grid values can change)."""
    return [
        k
        for k, v in spec.space.items()
        if k in old_space
        and old_space[k] != v
        and not (spec.sampler == "grid" and isinstance(v, list) and numeric(v) and numeric(old_space[k]))
    ]


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training overrides, test-time ablation parameters)."""
    train = {k: v for k, v in params.items() if not k.startswith("ablation.")}
    test = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("ablation.")}
    return train, test


def cli_value(v: Any) -> str:
    """A value as the fit parser reads it: null/true/false and JSON for lists and
    numbers, plain text for strings (JSON quotes would stay in a `str` option)."""
    return v if isinstance(v, str) else json.dumps(v)


def overrides_to_args(overrides: dict[str, Any]) -> list[str]:
    return [f"--{k}={cli_value(v)}" for k, v in overrides.items()]


def train_key(configs: list[str], overrides: dict[str, Any]) -> str:
    """Identity of a training config: trials sharing it share one checkpoint."""
    from pathlib import Path

    body = json.dumps({"configs": [Path(c).read_text() for c in configs], "overrides": overrides}, sort_keys=True)
    return hashlib.sha1(body.encode()).hexdigest()[:16]


def _check_range(key: str, v: dict[str, Any]) -> None:
    """A {low, high[, log, step, type]} range with numeric bounds."""
    extra = set(v) - {"low", "high", "log", "step", "type"}
    if not {"low", "high"} <= set(v) or extra:
        raise SweepError(f"sweep.space.{key} must be {{low, high}} (and optionally log, step, type); got {v!r}")
    if not numeric([v["low"], v["high"]]) or v["low"] > v["high"]:
        raise SweepError(f"sweep.space.{key}: low and high must be numbers with low <= high; got {v!r}")
    if v.get("type") not in (None, "int", "float") or not isinstance(v.get("log", False), bool):
        raise SweepError(f"sweep.space.{key}: type is int or float and log is true or false; got {v!r}")
    if v.get("step") is not None and (not numeric([v["step"]]) or v["step"] <= 0):
        raise SweepError(f"sweep.space.{key}: step must be a positive number; got {v!r}")
    # Optuna's own refusals, which failed every trial of the study instead.
    if v.get("log") and v["low"] <= 0:
        raise SweepError(f"sweep.space.{key}: a log range needs low > 0; got {v!r}")
    if v.get("log") and v.get("step") is not None:
        raise SweepError(f"sweep.space.{key}: give log or step, not both; got {v!r}")
