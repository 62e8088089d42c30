"""The trainer options a command would run with, checked before anything is built: counts
Lightning would divide by or loop on, limits that leave the command nothing to do, the seed,
and a fit without validation (which runs, and says what that means)."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from .errors import SEED_MAX, UserError, is_seed, not_a_seed


def resolve_seed(seed: Any, subcommand: str | None, ckpt: str | None) -> Any:
    """The seed_everything a command runs with: an integer seed as given (one outside numpy's range,
    which Lightning refuses with a traceback, is a UserError), false or null as given, and `true`
    drawn at random, as Lightning's help says (Lightning 2.x seeds 0 for it, or PL_GLOBAL_SEED: in a
    sweep worker, the previous trial's). A resumed fit keeps its run's seed (run.json), so that it
    continues the same data order; a DDP rank that rank 0 started (LOCAL_RANK > 0) takes rank 0's
    from PL_GLOBAL_SEED."""
    if seed is True:
        recorded = run_seed(Path(ckpt).resolve().parent.parent) if subcommand == "fit" and ckpt else None
        if is_seed(recorded):  # older runs may lack it
            return recorded
        if os.environ.get("LOCAL_RANK", "0") != "0" and "PL_GLOBAL_SEED" in os.environ:
            return int(os.environ["PL_GLOBAL_SEED"])
        return secrets.randbelow(SEED_MAX + 1)
    if not isinstance(seed, bool) and seed is not None and not is_seed(seed):
        raise UserError(f"seed_everything={not_a_seed(seed)} (or true: a random one)")
    return seed


def run_seed(run_dir: str | os.PathLike | None) -> int | None:
    """The seed a `fit` run trained with, from the run.json train.py writes (None where the
    folder or file is gone)."""
    path = Path(run_dir or "") / "run.json"
    try:
        seed = json.loads(path.read_text()).get("seed") if run_dir and path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def check_trainer_counts(t, subcommand: str | None) -> None:
    """Trainer counts that Lightning would divide by, or loop on, or that leave the command
    nothing to do, are checked up front."""

    def bad(name: str, why: str) -> UserError:
        return UserError(f"trainer.{name}={t.get(name)!r} {why}")

    fit = subcommand == "fit"
    stage = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}.get(subcommand or "")
    if stage and t.get(f"limit_{stage}_batches") == 0:
        what = "trains nothing" if fit else f"gives `{subcommand}` nothing to score"
        raise bad(f"limit_{stage}_batches", f"{what}: give a count of batches >= 1, a fraction in (0, 1], or drop it")
    if fit:
        for name in ("max_steps", "max_epochs"):
            v = t.get(name)
            if v is not None and (v == 0 or v < -1):
                raise bad(name, "must be a positive count (or -1 for no limit)")
    for name in ("check_val_every_n_epoch", "accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
        v = t.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad(name, "must be a positive integer" + (" (or null)" if name == "check_val_every_n_epoch" else ""))
    for name in ("min_steps", "min_epochs"):
        v = t.get(name)
        if v is not None and v < 0:
            raise bad(name, "must be >= 0")
    v = t.get("num_sanity_val_steps")
    if v is not None and v < -1:
        raise bad("num_sanity_val_steps", "must be >= 0 (or -1 for the whole validation set)")
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        v = t.get(name)
        if v is not None and (v < 0 or (isinstance(v, float) and v > 1 and v % 1)):  # 2.0 is 2 batches
            raise bad(name, "must be a count of batches >= 0, or a fraction in [0, 1]")
    v = t.get("gradient_clip_val")
    if v is not None and v < 0:  # Lightning clips nothing below 0, silently (its parser refuses nan and inf)
        raise bad("gradient_clip_val", "must be > 0 to clip gradients (0 or null: no clipping)")
    v = t.get("val_check_interval")
    if v is not None and not isinstance(v, str) and v <= 0:
        raise bad("val_check_interval", "must be > 0: a fraction of an epoch, or a count of training batches")
    devices = t.get("devices")
    count = devices is not None and not isinstance(devices, list) and str(devices).lstrip("-").isdigit()
    if count and (int(devices) == 0 or int(devices) < -1):
        raise bad("devices", "must be a positive count, -1 (all), a list of device ids, or auto")


def say_if_no_validation(cfg) -> None:
    """A fit without validation data does what it was asked and says what that means."""
    why = (
        "trainer.limit_val_batches=0" if cfg.trainer.get("limit_val_batches") == 0
        else "data.init_args.val_size=0" if (cfg.data.get("init_args") or {}).get("val_size") == 0
        else None
    )  # fmt: skip
    if why and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"resnet-lab fit: no validation ({why}): no val/ metrics and no best-*.ckpt; "
            "last.ckpt is kept and the final weights are tested",
            file=sys.stderr,
            flush=True,
        )
