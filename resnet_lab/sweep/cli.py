"""`resnet-lab sweep`: run (or summarize) the study in an experiment file's `sweep:` section.

resnet-lab sweep --config sweeps/depth.yaml --config sweeps/presets/depth-cpu.yaml
resnet-lab sweep --config sweeps/depth.yaml --sweep.storage postgresql://u:p@db:5432/optuna
resnet-lab sweep --config sweeps/depth.yaml --summary
optuna-dashboard sqlite:///runs/sweeps/depth/study.db
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import yaml

from ..errors import ArgumentParser, UserError, count, load_yaml
from .launch import parse_workers
from .space import SweepError, SweepSpec, overrides_to_args, split_params


def merged_sweep_section(configs: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for c in configs:
        p = Path(c)
        if not p.is_file():
            raise SweepError(f"config file {c} does not exist")
        d = load_yaml(p) or {}
        if not isinstance(d, dict) or not isinstance(d.get("sweep") or {}, dict):
            raise SweepError(f"{c} must be a YAML mapping whose `sweep:` is a mapping (see sweeps/depth.yaml)")
        # A later file replaces whole options (a preset's `space:` is the space, not a patch).
        merged.update(d.get("sweep") or {})
    return merged


def fit_config(configs: list[str], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved fit config of these files and overrides (via --print_config)."""
    from ..train import cli_main

    buf, err = io.StringIO(), io.StringIO()
    with redirect_stdout(buf), redirect_stderr(err):
        try:
            cli_main(
                [
                    "fit",
                    *[a for c in configs for a in ("--config", c)],
                    *overrides_to_args(overrides or {}),
                    "--print_config",
                ]
            )
        except SystemExit as e:
            if e.code not in (0, None):
                what = "sweep.space values do not parse" if overrides else "the fit config does not parse"
                raise SweepError(f"{what}: {err.getvalue().strip()[-1000:]}") from None
        except UserError as e:  # a bad option or value, in one line
            what = f"the fit options {overrides_to_args(overrides)} do not parse" if overrides else "the fit config"
            raise SweepError(f"{what}: {e}") from None
    return yaml.safe_load(buf.getvalue())


def check_single_process(cfg: dict[str, Any]) -> None:
    """Trials run inside the worker process. Lightning's DDP launcher re-runs the command
    line in its children, which would make each child a sweep worker of its own, so
    multi-process trials are refused with the way to run them."""
    t = cfg.get("trainer") or {}
    strategy = t.get("strategy")
    strategy = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "auto")
    devices, nodes = t.get("devices", "auto"), t.get("num_nodes", 1) or 1
    many = isinstance(devices, list) and len(devices) > 1 or str(devices).isdigit() and int(devices) > 1
    if many or nodes > 1 or any(k in strategy.lower() for k in ("ddp", "fsdp", "deepspeed")):
        raise SweepError(
            f"sweep trials run in one process, but the config asks for strategy={strategy!r}, devices={devices!r}, "
            f"num_nodes={nodes}. Run one worker per device instead (trainer.devices: 1, trainer.strategy: auto; "
            "start `resnet-lab sweep` once per GPU with CUDA_VISIBLE_DEVICES), or run a multi-GPU fit directly "
            "with `resnet-lab fit` (or as a W&B sweep agent, sweeps/wandb/)"
        )


def check_builds(cfg: dict[str, Any]) -> None:
    """What `fit` checks only when it starts, checked for a resolved cell config: the trainer
    counts, and the optimizer and lr scheduler built on a stand-in parameter (SGD's lr < 0,
    OneCycleLR's total_steps, ...)."""
    import torch

    from ..trainer_checks import check_trainer_counts

    check_trainer_counts(cfg.get("trainer") or {}, "fit")
    built: dict[str, Any] = {}
    for section in ("optimizer", "lr_scheduler"):
        conf = cfg.get(section)
        if not isinstance(conf, dict) or "class_path" not in conf:
            continue
        module, _, name = conf["class_path"].rpartition(".")
        first = [torch.nn.Parameter(torch.zeros(1))] if section == "optimizer" else built.get("optimizer")
        if first is None:
            continue
        try:
            built[section] = getattr(importlib.import_module(module), name)(first, **(conf.get("init_args") or {}))
        except (ValueError, TypeError) as e:
            raise UserError(f"{section} {conf['class_path']} does not build: {e}") from None


def walk_keys(d: Any, prefix: str = "") -> set[str]:
    keys = set()
    if isinstance(d, dict):
        for k, v in d.items():
            keys.add(prefix + k)
            keys |= walk_keys(v, prefix + k + ".")
    return keys


def fit_keys(configs: list[str]) -> set[str]:
    """Every dotted option the fit parser accepts with these configs."""
    return walk_keys(fit_config(configs))


def check_space_keys(spec: SweepSpec, configs: list[str]) -> None:
    keys = fit_keys(configs)
    for k in spec.space:
        if k.startswith("ablation."):
            continue
        if k not in keys:
            close = difflib.get_close_matches(k, sorted(keys), n=3, cutoff=0.6)
            raise SweepError(f"unknown parameter {k!r} in sweep.space; close matches: {close or 'none'}")
    # Each value must parse and build (types, choices, the optimizer's and scheduler's own
    # checks, trainer counts): one probe per value of each list (both ends of each range),
    # the other keys at their first value; no probe may ask for several processes.
    fit_space = {k: v for k, v in spec.space.items() if not k.startswith("ablation.")}
    first = {k: (v[0] if isinstance(v, list) else v["low"]) for k, v in fit_space.items()}
    probes = [first]
    for k, v in fit_space.items():
        probes += [{**first, k: x} for x in (v[1:] if isinstance(v, list) else [v["high"]])]
    for i, missing in spec.inactive_overrides():
        typos = [k for k in missing if k not in keys]
        if typos:
            close = {k: difflib.get_close_matches(k, sorted(keys), n=2, cutoff=0.6) for k in typos}
            raise SweepError(f"sweep.overrides[{i}].when names unknown option(s) {typos}; close matches: {close}")
        print(f"note: sweep.overrides[{i}] applies to no cell: {missing} not swept", file=sys.stderr)
    cells = spec.grid() if spec.sampler == "grid" else None
    for rule in spec.overrides or []:
        if cells is not None and not any(spec.cell_overrides(c) and _matches(rule, c) for c in cells):
            continue  # no cell of this grid gets it (e.g. a preset without depth 110)
        for k in rule["set"]:
            if k not in keys:
                close = difflib.get_close_matches(k, sorted(keys), n=3, cutoff=0.6)
                raise SweepError(f"unknown option {k!r} in sweep.overrides; close matches: {close or 'none'}")
        probes.append({**probes[0], **rule["set"]})
    resolved = [fit_config(configs, probe) for probe in probes]
    for probe, cfg in zip(probes, resolved):
        check_single_process(cfg)
        try:
            check_builds(cfg)
        except UserError as e:
            raise SweepError(f"sweep cell {probe}: {e}") from None
    check_cell_models(spec, resolved[0])  # every cell sets the swept keys of this first probe itself


def check_cell_models(spec: SweepSpec, base: dict[str, Any]) -> None:
    """Every cell's network must exist and suit its test-time ablation (each study's own
    check, e.g. a k_max within the net's blocks): an impossible depth or shortcut would
    otherwise fail each of those trials, and an unsuitable net only after it has trained."""
    from ..ablation.studies import check_nets
    from ..models import named_fields
    from ..module import SPEC_OPTIONS
    from ..train import spec_of

    cells = spec.grid() if spec.sampler == "grid" else [{}]
    seen: set[str] = set()
    for cell in cells:
        params = {**cell, **spec.cell_overrides(cell)}
        train, test = split_params(params)
        model = {k.split(".", 1)[1]: v for k, v in train.items() if k.startswith("model.")}
        key = json.dumps([model, test], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        cfg = dict(base.get("model") or {})
        if "arch" in model:  # the name's own fields give way to it (train.arch_starts_over)
            cfg.update({k: None for k in named_fields(str(model["arch"])) if k in SPEC_OPTIONS})
        cfg.update(model)
        try:
            net = spec_of(cfg)
            if spec.runs_ablation():
                check_nets([net], spec.study_options({**(spec.ablation or {}), **test}, "ablation"))
        except UserError as e:
            raise SweepError(f"sweep cell {params}: {e}") from None


def _matches(rule: dict[str, Any], cell: dict[str, Any]) -> bool:
    return all(cell.get(k) == v for k, v in rule["when"].items())


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="resnet-lab sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", action="append", required=True, help="experiment YAML(s), stacked like fit's")
    p.add_argument("--sweep.storage", dest="storage", default=None, help="sqlite:///... or postgresql://...")
    p.add_argument("--sweep.study_name", dest="study_name", default=None)
    p.add_argument(
        "--sweep.root", dest="root", default=None, help="folder of the study's runs (and its SQLite file by default)"
    )
    p.add_argument("--sweep.n_trials", dest="n_trials", type=count(1), default=None)
    p.add_argument("--max-trials", type=count(1), default=None, help="this worker runs at most N trials")
    p.add_argument(
        "--workers",
        type=parse_workers,
        default=None,
        metavar="N|gpus",
        help="start N workers of the study on this machine (one per GPU with `gpus`; on CPU cores // N threads "
        "each) and wait for them",
    )
    p.add_argument("--summary", action="store_true", help="print the trial table and write plots; run nothing")
    p.add_argument(
        "--no-summary", dest="no_summary", action="store_true",
        help="run trials without printing the study's summary at the end (--workers' workers: the launcher prints it)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="reuse a study name whose space differs")
    p.add_argument(
        "--threads",
        type=count(1),
        default=None,
        help="torch threads per trial (default: CPU cores // workers on this machine)",
    )
    return p


def load_spec(args: argparse.Namespace) -> SweepSpec:
    section = merged_sweep_section(args.config)
    for k in ("storage", "study_name", "root", "n_trials", "threads"):
        if getattr(args, k) is not None:
            section[k] = getattr(args, k)
    return SweepSpec.from_dict(section)


def without_workers(argv: list[str]) -> list[str]:
    """argv minus `--workers N` / `--workers=N`: each worker's own command line."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


def run_workers(spec: SweepSpec, args: argparse.Namespace, argv: list[str]) -> int:
    """Start --workers workers of the study, wait for them, print the summary."""
    from .launch import launch, placements
    from .run import load_existing_study, open_study, quiet_optuna
    from .summary import summarize

    quiet_optuna()
    envs = placements(args.workers, args.threads)
    open_study(spec, args.force)  # created and its grid enqueued once, before any worker starts
    rc = launch(without_workers(argv), envs)
    study = load_existing_study(spec)
    print(summarize(study, Path(spec.root) / spec.study_name / "summary", spec.metric))
    return rc


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        spec = load_spec(args)
        from .run import load_existing_study, run_worker
        from .summary import summarize

        failed = 0
        if args.workers is not None and not args.summary:
            check_space_keys(spec, args.config)
            return run_workers(spec, args, argv)
        if not args.summary:
            check_space_keys(spec, args.config)
            n, failed = run_worker(spec, args.config, force=args.force, max_trials=args.max_trials)
            more = args.max_trials is not None and n == args.max_trials
            print(f"worker ran {n} trial(s), {failed} failed" + ("" if more else "; the study has no more work"))
            if args.no_summary:
                return 1 if failed else 0
        study = load_existing_study(spec)  # read-only
        print(summarize(study, Path(spec.root) / spec.study_name / "summary", spec.metric))
        return 1 if failed else 0
    except UserError as e:
        print(f"resnet-lab sweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("resnet-lab sweep: interrupted; run the same command again to resume the study", file=sys.stderr)
        return 130
    return 0


def wandb_agent_command(
    sweep_config: dict[str, Any],
    params: dict[str, Any],
    workdir: Path,
    run_id: str = "testrun",
    sweep_id: str = "testsweep",
) -> list[str]:
    """The command line `wandb agent` runs for one parameter set: wandb's own
    `create_sweep_command` / `create_sweep_command_args` and the agent's macro loop."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(sweep_config.get("command"))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    json_file = workdir / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.json"
    if "${args_json_file}" in command:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(sweep_vars["args_json"][0])
    sweep_vars.update(
        interpreter=["python"],
        program=[sweep_config.get("program", "")],
        args_json_file=[str(json_file)],
        env=["/usr/bin/env"],
    )
    out: list[str] = []
    for c in map(str, command):  # the agent's own expansion (wandb_agent.Agent._command_run)
        out += (sweep_vars.get(c[2:-1]) or []) if c.startswith("${") and c.endswith("}") else [c]
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
