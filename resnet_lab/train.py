"""`resnet-lab fit|validate|test|predict`: LightningCLI plus the run bookkeeping.

Data flows one way: YAML config(s) -> this CLI -> DataModule + ResNetClassifier ->
Trainer -> checkpoints in the run's own directory. Each run gets

    {run.root}/{run.name}/{run_id}/
        config.yaml      the resolved config (re-runnable with --config)
        run.json         git commit, seed, command line, W&B id
        checkpoints/     last.ckpt (every run.checkpoint_every_n_steps) + best by val/error
        wandb/ csv/      logger output

`--ckpt_path .../checkpoints/last.ckpt` resumes in the same run directory (and the
same W&B run) at the saved global step, with optimizer, LR schedule and warm-up state.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import netrc
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback, LearningRateMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, ReduceLROnPlateau
from pytorch_lightning.loggers import WandbLogger
from torch.optim.lr_scheduler import OneCycleLR

from . import slurm
from .callbacks import AtomicCheckpointIO, BestCheckpoint, HistoryCSVLogger, LastCheckpoint, ValidateFinalStep
from .errors import UserError, load_yaml, user_error
from .models import Spec, named_fields, resolve_spec, spec_from_dict
from .module import SPEC_OPTIONS, CheckpointMismatchError, ResNetClassifier, check_spec_matches, read_checkpoint
from .schedules import PaperLR
from .trainer_checks import check_trainer_counts, resolve_seed, say_if_no_validation

REPO = Path(__file__).resolve().parent.parent
EVALUATIONS = ("validate", "test", "predict")  # subcommands that score a checkpoint


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def wandb_offline() -> bool:
    """Offline unless a W&B API key is configured (env or ~/.netrc) and the mode allows it."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (OSError, netrc.NetrcParseError):
        return True


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, int | float | str | bool | type(None)) else str(v)
    return out


class OptionError(UserError, ValueError):
    """A command-line option or config value the parser refuses."""


class ResNetLabArgumentParser(LightningArgumentParser):
    """One line for a bad option or value, with a "did you mean"; the usage only with --help."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse is trying alternatives: keep its protocol
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        words = parser.prog.replace(" [options]", "").split()
        prog = " ".join(["resnet-lab", *words[1:]])
        raise OptionError(
            f"{condense_parser_message(message, _option_names(parser))} ({prog} --help lists every option)"
        )


def _option_names(parser) -> list[str]:
    names = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for action in parser._actions:  # subcommand parsers (fit, validate, ...)
        for sub in (
            (getattr(action, "choices", None) or {}).values() if isinstance(action, argparse._SubParsersAction) else ()
        ):
            names += _option_names(sub)
    return sorted(set(names))


def condense_parser_message(message: str, options: list[str]) -> str:
    """jsonargparse's multi-line message as one line: the key, the value, what was
    expected; for an unknown option, the nearest known ones."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    head = lines[0] if lines else message
    key = re.match(r'Parser key "([^"]+)"', head)
    if key:
        name = key[1]
        given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None)
        got = re.search(r"Got value: (.*)", message)
        given = given if given is not None or got is None else got[1].strip()
        nested = re.search(r"NestedArg\(key='([\w.]+)', val='([^']*)'\)", message)
        if nested:  # --lr_scheduler.init_args.gamma abc: jsonargparse reports the whole class option
            name, given = f"{name}.init_args.{nested[1]}", nested[2]
        found = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>|\b(int|float|bool)\b", message)
        types = [t for t in dict.fromkeys(a or b for a, b in found) if t in ("int", "float", "bool", "NoneType")]
        detail = next(
            (ln for ln in lines[1:] if not ln.startswith(("Given value", "- ", "Subtypes", "Errors", "Does not"))), ""
        )
        choices = [v for lit in re.findall(r"Literal\[([^\]]*)\]", message) for v in lit.split(", ")]
        want = f" (expected {' or '.join(t.replace('NoneType', 'null') for t in types)})" if types else ""
        if choices:  # --trainer.precision 17: name the values it takes, not only "null"
            values = [*dict.fromkeys(choices), *(["null"] if "NoneType" in types else [])]
            want = f" (expected one of: {', '.join(values)})"
        what = f"invalid value {given!r} for --{name}" if given is not None else f"--{name}: {detail or head}"
        return what + want
    unknown = re.match(r"unrecognized arguments: (.*)", head)
    if unknown:
        flags = [a.split("=", 1)[0] for a in unknown[1].split() if a.startswith("--")]
        hints = {f: difflib.get_close_matches(f, options, n=2, cutoff=0.75) for f in flags}
        hint = "; ".join(f"did you mean {' or '.join(h)}?" for f, h in hints.items() if h)
        return f"unknown option {', '.join(flags) or unknown[1]}" + (f": {hint}" if hint else "")
    return head


class ResNetLabCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument("--run.root", default="runs", help="parent of all run directories")
        parser.add_argument("--run.name", default=None, help="experiment name (default: the model, e.g. resnet56)")
        parser.add_argument(
            "--run.logger",
            default="wandb",
            choices=["wandb", "csv", "both", "none"],
            help="W&B (offline without an API key) or none; csv/metrics.csv is written in every run",
        )
        parser.add_argument("--run.wandb_project", default="resnet-lab")
        parser.add_argument("--run.wandb_group", default=None, help="W&B group (a sweep uses its study name)")
        parser.add_argument("--run.tags", type=list[str], default=[])
        parser.add_argument(
            "--run.test_after_fit",
            type=bool,
            default=True,
            help="evaluate the final weights on the test split when fit ends",
        )
        parser.add_argument(
            "--run.untrained",
            type=bool,
            default=False,
            help="validate/test/predict without --ckpt_path score the random initialisation: allow it knowingly",
        )
        parser.add_argument(
            "--run.checkpoint_every_n_steps",
            type=int,
            default=500,
            help="last.ckpt interval: a killed fit loses at most this many steps",
        )
        # The sweep section of an experiment file belongs to `resnet-lab sweep`; fit ignores it.
        parser.add_argument("--sweep", type=dict | None, default=None, help="ignored by fit (see resnet-lab sweep)")

    def _parse_ckpt_path(self) -> None:
        # Lightning would silently replace the configured model with the checkpoint's
        # hyperparameters; a mismatch is almost always a mistake, so refuse it.
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else None
        ckpt = cfg.get("ckpt_path") if cfg else None
        if not ckpt and sub == "fit":
            ckpt = self._slurm_resume(cfg)
        if ckpt:
            if ckpt == "last":
                cfg.ckpt_path = ckpt = str(latest_checkpoint(cfg))
            elif ckpt in ("best", "hpc", "registry"):
                raise CheckpointMismatchError(
                    f"--ckpt_path {ckpt} is not supported: pass a checkpoint file "
                    "(runs/NAME/RUN/checkpoints/last.ckpt or best-*.ckpt), or `last` for the newest run of this model"
                )
            if not Path(ckpt).is_file():
                raise CheckpointMismatchError(f"--ckpt_path {ckpt} does not exist (use a run's checkpoints/last.ckpt)")
            check_checkpoint_matches(ckpt, cfg.model)
        super()._parse_ckpt_path()

    @staticmethod
    def _slurm_resume(cfg) -> str | None:
        """A fit of a restarted Slurm job resumes its run (see slurm.py)."""
        if not slurm.restarted() or slurm.job_id() is None:
            return None
        name = cfg.run.name or spec_of(dict(cfg.model)).name
        point = slurm.resume_point(Path(cfg.run.root) / name / f"slurm-{slurm.job_id()}")
        if point is not None:
            cfg.ckpt_path = str(point)
            print(f"Slurm job {slurm.job_id()} restarted: resuming from {point}", flush=True)
        return cfg.ckpt_path

    def _set_seed(self) -> None:
        """Lightning's seeding of a checked seed, `true` drawn (trainer_checks.resolve_seed); the
        seed goes into the config, so config.yaml and run.json record it."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        cfg["seed_everything"] = resolve_seed(cfg.get("seed_everything"), self.subcommand, cfg.get("ckpt_path"))
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.get("data") is None:
            raise UserError(
                f"no data configured. Start from an experiment file: resnet-lab {self.subcommand} "
                "--config sweeps/depth.yaml --config sweeps/presets/cpu-quick.yaml"
            )
        check_trainer_counts(cfg.trainer, self.subcommand)
        if self.subcommand == "fit":
            say_if_no_validation(cfg)
        if cfg.run.checkpoint_every_n_steps < 1:
            raise UserError(f"run.checkpoint_every_n_steps={cfg.run.checkpoint_every_n_steps} must be >= 1")
        if cfg.run.logger in ("wandb", "both") and importlib.util.find_spec("wandb") is None:
            raise UserError(
                f"run.logger={cfg.run.logger} but wandb is not installed (offline nodes often lack it): "
                "pip install wandb, or log to CSV only with --run.logger csv"
            )
        if self.subcommand in EVALUATIONS and not cfg.get("ckpt_path") and not cfg.run.untrained:
            raise UserError(
                f"`resnet-lab {self.subcommand}` without --ckpt_path would score randomly initialised weights. Pass "
                "--ckpt_path runs/NAME/RUN/checkpoints/last.ckpt (or `last` for this model's newest run), or "
                "--run.untrained true to score the initialisation on purpose"
            )

    def instantiate_classes(self) -> None:
        """Build the configured objects; a value a class refuses (Trainer devices=0, SGD
        lr=-0.1) is a config error: one message naming the section, not a traceback."""
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as e:
            if user_error(e) is not None:  # ours, maybe wrapped by jsonargparse: it names the fix
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OptionError(f"the config does not build ({type(e).__name__}): {first}") from e

    def _run_subcommand(self, subcommand: str) -> None:
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        try:
            super()._run_subcommand(subcommand)
        except MisconfigurationException as e:  # found by Lightning once the data is known: still the config's
            self._remove_if_empty()
            raise OptionError(str(e).strip().splitlines()[0]) from e
        except BaseException:
            self._remove_if_empty()
            raise

    def _remove_if_empty(self) -> None:
        """A fit that fails before its first step leaves no run directory behind."""
        run_dir = getattr(self, "run_dir", None)
        if (
            self.subcommand == "fit"
            and getattr(self, "created_run_dir", False)
            and run_dir is not None
            and self.trainer.global_step == 0
            and not any((run_dir / "checkpoints").glob("*.ckpt"))
        ):
            shutil.rmtree(run_dir, ignore_errors=True)

    def after_fit(self) -> None:
        if self.trainer.global_step == 0 and not self.trainer.interrupted:
            raise UserError(
                f"fit trained no step: the training data gave {self.trainer.num_training_batches} batches (is "
                "data.init_args.batch_size larger than the training set? full batches only). Lower the batch size, "
                "or raise trainer.limit_train_batches"
            )
        # Keep fit's final metrics (train/, val/): test() replaces callback_metrics.
        self.fit_metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        self.test_metrics: dict[str, float] = {}
        cfg = self.config[self.subcommand]
        if not cfg.run.test_after_fit or self.trainer.interrupted:
            return
        # The final weights, as the paper reports them.
        self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)
        self.test_metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        best = next((c.best_model_path for c in self.trainer.checkpoint_callbacks if c.monitor == "val/error"), "")
        if best and Path(best).is_file():
            # Separately labelled: the checkpoint selected by val/error, logged as best_test/*.
            self.model.test_label = "best_test"
            try:
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
            finally:
                self.model.test_label = "test"
            self.test_metrics.update(
                {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("best_test/")}
            )
            self.test_metrics["best_test/step"] = float(torch.load(best, weights_only=False)["global_step"])

    @staticmethod
    def configure_optimizers(lightning_module: LightningModule, optimizer, lr_scheduler=None) -> Any:
        if lr_scheduler is None:
            return optimizer
        if isinstance(lr_scheduler, ReduceLROnPlateau):
            cfg = {"scheduler": lr_scheduler, "monitor": lr_scheduler.monitor, "interval": "epoch"}
        else:
            # PaperLR counts iterations (the paper's milestones), OneCycleLR is per step by
            # definition; other torch schedulers keep Lightning's per-epoch stepping.
            per_step = isinstance(lr_scheduler, PaperLR | OneCycleLR)
            cfg = {"scheduler": lr_scheduler, "interval": "step" if per_step else "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": cfg}

    # -- the run directory --------------------------------------------------
    def _run_dir(self, cfg) -> Path | None:
        """The run directory: a new one for a fit, the checkpoint's for a resume or an
        evaluation of a run's checkpoint; None for validate/test/predict of anything else
        (they print their metrics and write nothing)."""
        # DDP children re-run this CLI; they must land in the parent's directory.
        if int(os.environ.get("LOCAL_RANK", "0")) > 0 and os.environ.get("RESNET_LAB_RUN_DIR"):
            return Path(os.environ["RESNET_LAB_RUN_DIR"])
        ckpt = cfg.get("ckpt_path")
        if ckpt and Path(ckpt).parent.name == "checkpoints" and (Path(ckpt).parent.parent / "run.json").exists():
            return Path(ckpt).parent.parent  # resuming: same run directory, same W&B run
        if self.subcommand in EVALUATIONS:
            return None
        name = cfg.run.name or self.model.spec.name
        if self.subcommand == "fit" and (job_dir := slurm.run_dir(Path(cfg.run.root), name)) is not None:
            return job_dir
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
        return Path(cfg.run.root) / name / run_id

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = self._run_dir(cfg)
        self.run_dir = run_dir = run_dir.resolve() if run_dir is not None else None
        self.created_run_dir = run_dir is not None and not run_dir.exists()
        if self.created_run_dir:
            try:
                run_dir.mkdir(parents=True)
            except OSError as e:
                raise UserError(
                    f"cannot create the run directory {run_dir} ({e.strerror}); set --run.root to a writable place"
                ) from e
        self.run_info = self._run_info(cfg, run_dir) if run_dir else {}  # git commit etc., read once
        if run_dir is not None:
            os.environ["RESNET_LAB_RUN_DIR"] = str(run_dir)
        trainer_cfg = self._get(self.config_init, "trainer", default={})  # instantiated objects
        if trainer_cfg.get("logger") in (None, True):  # the user did not pick loggers: ours
            kwargs["logger"] = (self._loggers(cfg, run_dir) if run_dir else []) or False
        kwargs["callbacks"] = [*_as_list(trainer_cfg.get("callbacks")), *self._callbacks(run_dir, kwargs["logger"])]
        kwargs["plugins"] = [*_as_list(trainer_cfg.get("plugins")), AtomicCheckpointIO()]
        if self.subcommand in EVALUATIONS:  # evaluation writes no checkpoints
            kwargs["enable_checkpointing"] = False
        if trainer_cfg.get("default_root_dir") is None and run_dir is not None:
            kwargs["default_root_dir"] = str(run_dir)
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.is_global_zero and run_dir is not None:
            self._write_run_files(cfg, run_dir, trainer)
        return trainer

    def _run_info(self, cfg, run_dir: Path) -> dict[str, Any]:
        info_path = run_dir / "run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info.setdefault("wandb_id", run_dir.name.replace("-", "")[:32])
        info.update(git_commit=git_commit(), seed=cfg.get("seed_everything"), argv=sys.argv, run_dir=str(run_dir))
        return info

    def _loggers(self, cfg, run_dir: Path) -> list[Any]:
        loggers: list[Any] = []
        if cfg.run.logger in ("wandb", "both"):
            loggers.append(
                WandbLogger(
                    project=cfg.run.wandb_project,
                    save_dir=str(run_dir),
                    id=self.run_info["wandb_id"],
                    group=cfg.run.wandb_group,
                    tags=list(cfg.run.tags) or None,
                    offline=wandb_offline(),
                    resume="allow",
                    name=f"{run_dir.parent.name}/{run_dir.name}",
                )
            )
        # A local metrics file in every run, whatever the logger: curves need no W&B server.
        # validate/test/predict on a run's checkpoint write beside it, never into fit's history.
        if self.subcommand == "fit":
            loggers.append(HistoryCSVLogger(str(run_dir), resume_step=resume_step(cfg.get("ckpt_path"))))
        else:
            loggers.append(HistoryCSVLogger(str(run_dir), name=f"csv-{self.subcommand}"))
        return loggers

    def _callbacks(self, run_dir: Path | None, loggers: Any) -> list[Callback]:
        if self.subcommand in EVALUATIONS:
            return []
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_dir = run_dir / "checkpoints"
        callbacks: list[Callback] = [
            ValidateFinalStep(),
            LastCheckpoint(
                dirpath=ckpt_dir,
                save_last=True,
                save_top_k=0,
                every_n_train_steps=cfg.run.checkpoint_every_n_steps,
                enable_version_counter=False,  # a resumed run overwrites last.ckpt, never writes last-v1.ckpt
            ),
            BestCheckpoint(
                dirpath=ckpt_dir,
                monitor="val/error",
                mode="min",
                save_top_k=1,
                filename="best-step{step}-err{val/error:.2f}",
                auto_insert_metric_name=False,
            ),
        ]
        if loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if slurm.job_id() is not None:
            callbacks.append(slurm.SlurmRequeue(ckpt_dir / slurm.REQUEUE))
        return callbacks

    def _write_run_files(self, cfg, run_dir: Path, trainer: Trainer) -> None:
        """config.yaml (data paths resolved), run.json, and the hyperparameters of every logger."""
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = cfg.clone()
        for key, value in getattr(self.datamodule, "resolved_paths", dict)().items():
            cfg.data.init_args[key] = value  # absolute: `ablate` works from any directory
        # One file per run directory, so a second run (or a W&B logger, whose log_dir is
        # shared) never collides with the first. validate/test/predict add their own file.
        name = "config.yaml" if self.subcommand == "fit" else f"config-{self.subcommand}.yaml"
        self._parser(self.subcommand).save(cfg, run_dir / name, overwrite=True, skip_none=False)
        info = self.run_info
        if self.subcommand == "fit":
            (run_dir / "run.json").write_text(json.dumps(info, indent=2, default=str))
        flat = flatten(cfg.as_dict())
        flat.pop("config", None)
        flat.update({f"spec.{k}": v for k, v in self.model.spec.to_dict().items()})
        flat.update(git_commit=info["git_commit"], seed=info["seed"], run_dir=str(run_dir))
        for lg in trainer.loggers:
            lg.log_hyperparams(flat)
            if isinstance(lg, WandbLogger):
                define_wandb_metrics(lg.experiment)


def _as_list(x: Any) -> list[Any]:
    return [] if x is None else list(x) if isinstance(x, list) else [x]


def resume_step(ckpt_path: str | None) -> int | None:
    """The global step a fit resumes at, or None for a fresh fit."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=False).get("global_step", 0))


def latest_checkpoint(cfg) -> Path:
    """`--ckpt_path last`: the newest last.ckpt among this experiment's runs."""
    name = cfg.run.name or spec_of(dict(cfg.model)).name
    found = sorted(Path(cfg.run.root).glob(f"{name}/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointMismatchError(
            f"--ckpt_path last: no {Path(cfg.run.root) / name}/*/checkpoints/last.ckpt to resume; "
            "drop --ckpt_path to start a new run, or pass a checkpoint file"
        )
    return found[-1]


def _spec_fields(model_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: model_cfg.get(k) for k in SPEC_OPTIONS}


def spec_of(model_cfg: dict[str, Any]) -> Spec:
    """The architecture a resolved `model:` config section builds (what ResNetClassifier does)."""
    if model_cfg.get("spec"):
        return spec_from_dict(model_cfg["spec"])
    return resolve_spec(model_cfg.get("arch") or "resnet20", **_spec_fields(model_cfg))


def check_checkpoint_matches(ckpt_path: str, model_cfg) -> None:
    """Raise CheckpointMismatchError unless the checkpoint holds the configured architecture."""
    ckpt = read_checkpoint(ckpt_path, weights_only=True)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    m = dict(model_cfg)
    want = spec_of(m)
    # num_classes comes from the data (linked at instantiation) unless set explicitly.
    ignore = ("num_classes",) if m.get("num_classes") is None else ()
    check_spec_matches(hp.get("spec"), want, ckpt_path, ignore)


def define_wandb_metrics(run) -> None:
    """Summaries a dashboard can plot across runs without custom code."""
    for stage in ("val", "test", "train"):
        run.define_metric(f"{stage}/error", summary="min")
        run.define_metric(f"{stage}/error5", summary="min")
        run.define_metric(f"{stage}/acc", summary="max")
        run.define_metric(f"{stage}/loss", summary="min")


def expand_args_json(args: list[str]) -> list[str]:
    """`--args_json FILE` (what a W&B sweep's ${args_json_file} points to) becomes one
    `--key=value` per entry: null/true/false and numbers as JSON, so they survive, and
    strings as plain text."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--args_json" or a.startswith("--args_json="):
            path = a.split("=", 1)[1] if "=" in a else args[i + 1]
            i += 1 if "=" in a else 2
            params = json.loads(Path(path).read_text())
            out += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items()]
            continue
        out.append(a)
        i += 1
    return out


# Library messages that are known and harmless here. They repeated for every sweep trial.
KNOWN_WARNINGS = (
    "LightningCLI's args parameter is intended",  # in-process callers (sweeps, tests) pass args on purpose
    r"`ResNetClassifier.configure_optimizers` will be overridden",  # the CLI's optimizer: sections, by design
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside pytorch_lightning, with this torch
    "Checkpoint directory .* exists and is not empty",  # every fit has its own run directory; a resume reuses it
)


def quiet_known_warnings() -> None:
    """Hide KNOWN_WARNINGS and Lightning's litlogger tip (idempotent)."""
    import logging
    import warnings

    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(getattr(f, "resnet_lab", False) for f in log.filters):
        tip = logging.Filter()
        tip.filter = lambda record: "litlogger" not in record.getMessage()  # type: ignore[method-assign]
        tip.resnet_lab = True  # type: ignore[attr-defined]
        log.addFilter(tip)


def check_config_files(args: list[str]) -> None:
    """A --config file that is not valid YAML: one line with its name, line and column."""
    for i, a in enumerate(args):
        path = (
            a.split("=", 1)[1]
            if a.startswith("--config=")
            else args[i + 1]
            if a == "--config" and i + 1 < len(args)
            else None
        )
        if path and Path(path).is_file():
            load_yaml(path)


def arch_starts_over(args: list[str]) -> list[str]:
    """`--model.arch NAME` on the command line overrides what a --config file says about the
    fields the name states (`resnet56`: depth, plain, preact, block type).

    Those fields, unless a command-line flag sets them too, are cleared right after the
    flag, so `--config sweeps/depth.yaml --model.arch resnet56` builds resnet56 although
    the file says `depth: 20`. Everything the name leaves open (shortcut, width, stochastic
    depth, ...) keeps the config's value. A flag that contradicts the name
    (`--model.arch plain20 --model.plain false`) is refused by the registry."""
    at = [i for i, a in enumerate(args) if a == "--model.arch" or a.startswith("--model.arch=")]
    if not at:
        return args
    flag = args[at[-1]]
    end = at[-1] + (1 if "=" in flag else 2)
    name = flag.split("=", 1)[1] if "=" in flag else (args[at[-1] + 1] if end <= len(args) else "")
    flagged = {a[len("--model.") :].split("=", 1)[0] for a in args if a.startswith("--model.")}
    reset = [f"--model.{k}=null" for k in named_fields(name) if k in SPEC_OPTIONS and k not in flagged]
    return [*args[:end], *reset, *args[end:]]


def cli_main(args: list[str] | None = None, run: bool = True, extra_callbacks: list[Any] | None = None) -> ResNetLabCLI:
    """Run the CLI (in-process callers pass `args`). Any W&B run it opened is
    finished on return, so in-process callers (sweeps, tests) get one run each.
    `extra_callbacks` are added to the Trainer (a sweep's pruning callback)."""
    quiet_known_warnings()
    check_config_files(sys.argv[1:] if args is None else args)
    if args is None:  # the console: Lightning's DDP launcher re-runs sys.argv in its children
        sys.argv = [sys.argv[0], *arch_starts_over(expand_args_json(sys.argv[1:]))]
    else:
        args = arch_starts_over(expand_args_json(args))
    try:
        return _make_cli(args, run, extra_callbacks or [])
    finally:
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()


def _make_cli(args: list[str] | None, run: bool, extra_callbacks: list[Any]) -> ResNetLabCLI:
    return ResNetLabCLI(
        ResNetClassifier,
        None,  # any LightningDataModule: data.class_path picks CIFAR10DataModule or ImageNetDataModule
        subclass_mode_data=True,
        save_config_callback=None,  # saved per run directory above
        trainer_defaults={
            "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
            "callbacks": extra_callbacks,
        },
        parser_kwargs={"allow_abbrev": False},
        parser_class=ResNetLabArgumentParser,
        args=args,
        run=run,
    )
