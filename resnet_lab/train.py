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

import json
import netrc
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, ReduceLROnPlateau
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch.optim.lr_scheduler import OneCycleLR

from .models import ResNetSpec, resolve_spec
from .module import CheckpointMismatchError, ResNetClassifier, check_spec_matches
from .schedules import PaperLR

REPO = Path(__file__).resolve().parent.parent


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, then rename: a kill mid-save never corrupts the
    previous last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt every N steps, and once more when training ends."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class FirstStepMark(Callback):
    """Writes the wall time of the first training batch to a file (scripts/bench_trial.py)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.path:
            Path(self.path).write_text(repr(time.time()))
            self.path = ""


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


class ResNetLabCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument("--run.root", default="runs", help="parent of all run directories")
        parser.add_argument("--run.name", default=None, help="experiment name (default: the model, e.g. resnet56)")
        parser.add_argument("--run.logger", default="wandb", choices=["wandb", "csv", "both", "none"])
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
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry"):
            if not Path(ckpt).is_file():
                raise FileNotFoundError(f"--ckpt_path {ckpt} does not exist (use a run's checkpoints/last.ckpt)")
            check_checkpoint_matches(ckpt, self.config[sub].model)
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        # Keep fit's final metrics (train/, val/): test() replaces callback_metrics.
        self.fit_metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        cfg = self.config[self.subcommand]
        if cfg.run.test_after_fit and not self.trainer.interrupted:
            # The final weights, as the paper reports; best-by-val is in checkpoints/.
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)

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
    def _run_dir(self, cfg) -> Path:
        # DDP children re-run this CLI; they must land in the parent's directory.
        if int(os.environ.get("LOCAL_RANK", "0")) > 0 and os.environ.get("RESNET_LAB_RUN_DIR"):
            return Path(os.environ["RESNET_LAB_RUN_DIR"])
        ckpt = cfg.get("ckpt_path")
        if (
            ckpt
            and ckpt not in ("last", "best")
            and Path(ckpt).parent.name == "checkpoints"
            and (Path(ckpt).parent.parent / "run.json").exists()
        ):
            return Path(ckpt).parent.parent  # resuming: same run directory, same W&B run
        name = cfg.run.name or self.model.spec.name
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
        return Path(cfg.run.root) / name / run_id

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        self.run_dir = run_dir = self._run_dir(cfg).resolve()
        os.environ["RESNET_LAB_RUN_DIR"] = str(run_dir)
        info_path = run_dir / "run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info.setdefault("wandb_id", run_dir.name.replace("-", "")[:32])
        info.update(git_commit=git_commit(), seed=cfg.get("seed_everything"), argv=sys.argv, run_dir=str(run_dir))

        trainer_cfg = self._get(self.config_init, "trainer", default={})  # instantiated objects
        loggers: list[Any] = []
        if trainer_cfg.get("logger") in (None, True):  # the user did not pick loggers: ours
            if cfg.run.logger in ("wandb", "both"):
                loggers.append(
                    WandbLogger(
                        project=cfg.run.wandb_project,
                        save_dir=str(run_dir),
                        id=info["wandb_id"],
                        group=cfg.run.wandb_group,
                        tags=list(cfg.run.tags) or None,
                        offline=wandb_offline(),
                        resume="allow",
                        name=f"{run_dir.parent.name}/{run_dir.name}",
                    )
                )
            if cfg.run.logger in ("csv", "both"):
                loggers.append(CSVLogger(str(run_dir), name="csv", version=""))
            kwargs["logger"] = loggers or False
        ckpt_dir = run_dir / "checkpoints"
        callbacks = [
            LastCheckpoint(
                dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=cfg.run.checkpoint_every_n_steps
            ),
            ModelCheckpoint(
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
        if os.environ.get("RESNET_LAB_FIRST_STEP_FILE"):
            callbacks.append(FirstStepMark(os.environ["RESNET_LAB_FIRST_STEP_FILE"]))
        user_cbs = trainer_cfg.get("callbacks") or []
        kwargs["callbacks"] = [*(user_cbs if isinstance(user_cbs, list) else [user_cbs]), *callbacks]
        plugins = trainer_cfg.get("plugins") or []
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()]
        if trainer_cfg.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(run_dir)
        trainer = super().instantiate_trainer(**kwargs)

        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            # Our own config save: one file per run directory, so a second run (or a
            # W&B logger, whose log_dir is shared) never collides with the first.
            # validate/test/predict on a run's checkpoint add their own file beside it.
            name = "config.yaml" if self.subcommand == "fit" else f"config-{self.subcommand}.yaml"
            self._parser(self.subcommand).save(cfg, run_dir / name, overwrite=True, skip_none=False)
            if self.subcommand == "fit":
                info_path.write_text(json.dumps(info, indent=2, default=str))
            flat = flatten(cfg.clone().as_dict())
            flat.pop("config", None)
            flat.update({f"spec.{k}": v for k, v in self.model.spec.to_dict().items()})
            flat.update(git_commit=info["git_commit"], seed=info["seed"], run_dir=str(run_dir))
            for lg in trainer.loggers:
                lg.log_hyperparams(flat)
                if isinstance(lg, WandbLogger):
                    define_wandb_metrics(lg.experiment)
        return trainer


def check_checkpoint_matches(ckpt_path: str, model_cfg) -> None:
    """Raise CheckpointMismatchError unless the checkpoint holds the configured architecture."""
    try:
        hp = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
    except Exception as e:
        raise CheckpointMismatchError(f"{ckpt_path} is not a readable checkpoint: {e}") from e
    m = dict(model_cfg)
    if m.get("spec"):
        want = ResNetSpec.from_dict(m["spec"])
    else:
        fields = ("depth", "shortcut", "plain", "num_classes", "stride_on", "zero_init_residual", "base_width")
        want = resolve_spec(m.get("arch") or "resnet20", **{k: m.get(k) for k in fields})
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


def cli_main(args: list[str] | None = None, run: bool = True, extra_callbacks: list[Any] | None = None) -> ResNetLabCLI:
    """Run the CLI (in-process callers pass `args`). Any W&B run it opened is
    finished on return, so in-process callers (sweeps, tests) get one run each.
    `extra_callbacks` are added to the Trainer (a sweep's pruning callback)."""
    if args is None and any(a.startswith("--args_json") for a in sys.argv):
        args = expand_args_json(sys.argv[1:])
    elif args is not None:
        args = expand_args_json(args)
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
        args=args,
        run=run,
    )
