"""`resnet-lab ablate`: lesion studies on one or more checkpoints, written as a report.

    resnet-lab ablate runs/resnet20/*/checkpoints/last.ckpt runs/plain20/*/checkpoints/last.ckpt \\
        --out reports/r20-vs-p20 --studies single k reorder responses --k-max 5 --samples 10
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentParser, UserError, count
from .report import complete, lesion_summary, write_report
from .runner import (
    AblationError,
    Loaded,
    Store,
    build_datamodule,
    check_blocks,
    check_compatible,
    device_label,
    full_float32,
    load_checkpoints,
    manifest_for,
    resolve_device,
    run_checkpoint,
    settle_init_bn,
)
from .stats import samples
from .studies import REGISTRY, StudyOptions, check_nets
from .study import common_of


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="resnet-lab ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="checkpoints written by `resnet-lab fit` (e.g. a resnet and its plain twin), or torchvision weights: "
        "torchvision:resnet50 (the local torch hub cache, never downloaded), torchvision:resnet50=FILE, or a "
        "state-dict FILE; or init:ARCH[@SEED], a freshly initialised network of any registered architecture "
        "(seeded by @SEED, default --seed), e.g. init:resnet56 init:plain56",
    )
    p.add_argument("--out", required=True, help="report directory (resumable; refuses a different configuration)")
    add_study_options(p)
    p.add_argument("--batch-size", type=count(1), default=500, help="images per chunk (bounds memory)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the studies run: cpu, cuda, cuda:N, or auto (CUDA when visible); float32 in full precision "
        "(no TF32); the report says which device computed how many units",
    )
    p.add_argument(
        "--data-folder",
        default=None,
        help="override the data location stored with the run (for torchvision weights: an ImageNet-layout "
        "folder with val/<wnid>/, or the val folder itself)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a report of a different configuration")
    p.add_argument("--wandb", action="store_true", help="log tables and plots to a W&B run (offline without a key)")
    p.add_argument("--wandb-project", default="resnet-lab")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_study_options(p: argparse.ArgumentParser) -> None:
    """One flag per field of StudyOptions (the common options and every study's), as declared there."""
    for f in fields(StudyOptions):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"default": f.default, "help": m["help"], "metavar": m["metavar"]}
        if m["kind"] in ("count", "count?"):
            kw["type"] = count(1)
        elif m["kind"] == "seed":
            kw["type"] = int  # its range is StudyOptions' check
        elif m["kind"] in ("float", "float>0"):
            kw["type"] = float  # nan, inf and (for float>0) values <= 0 are refused by StudyOptions
        elif m["kind"] == "choice":
            kw["choices"] = m["choices"]
        else:  # names, studies
            kw["nargs"] = "+"
            kw["choices"] = m["choices"] or None
            kw["default"] = list(f.default) if f.default else None
        p.add_argument(flag, **kw)


def command_for(checkpoints: list[str], out: Path, opts: Any) -> str:
    """The `resnet-lab ablate` command line that runs `opts` (non-default options only)."""
    argv = [*checkpoints, "--out", str(out)]
    for f in fields(opts):
        v = getattr(opts, f.name)
        if v != f.default:
            argv += ["--" + f.name.replace("_", "-"), *(map(str, v) if isinstance(v, tuple) else [str(v)])]
    return "resnet-lab ablate " + shlex.join(argv)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        run(args, argv)
    except UserError as e:
        print(f"resnet-lab ablate: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    opts = StudyOptions(**{f.name: getattr(args, f.name) for f in fields(StudyOptions)})
    return ablate(
        args.checkpoints,
        Path(args.out),
        opts,
        command="resnet-lab ablate " + shlex.join(argv),
        batch_size=args.batch_size,
        device=args.device,
        data_folder=args.data_folder,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        wandb_project=args.wandb_project if args.wandb else None,
    )


def ablate(
    checkpoints: list[str],
    out: Path,
    opts: Any,
    *,
    command: str,
    batch_size: int = 500,
    device: str = "cpu",
    data_folder: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    wandb_project: str | None = None,
) -> Path:
    """Run the selected studies on the checkpoints into `out` (resumable) and write the report."""
    where = resolve_device(device)
    with torch.no_grad(), full_float32(where):  # scoped: an in-process sweep goes on to train
        ckpts = load_checkpoints(checkpoints, opts.seed)
        for c in ckpts:
            c.model.to(where)  # init: nets are drawn on the CPU first: the same weights on any device
        check_compatible(ckpts)
        base = next((c for c in ckpts if not c.init), ckpts[0])  # whose data the report uses
        if (base.pretrained or base.init and base.spec.family == "imagenet") and data_folder is None:
            raise AblationError(
                f"{base.label} carries no data location: pass --data-folder with an ImageNet-layout folder "
                "(val/<wnid>/..., or the val folder itself)"
            )
        for c in ckpts:
            check_blocks(c.model, list(opts.blocks) if opts.blocks else None)
        check_nets([c.spec for c in ckpts], opts, [c.model for c in ckpts])
        dm = build_datamodule(
            base.data, folder=data_folder, augment=False, eval_batch_size=batch_size, batch_size=batch_size
        )
        dm.setup("test")
        check_compatible(ckpts, dm.num_classes)
        for c in ckpts:
            if c.init:
                settle_init_bn(c, dm, opts.seed)
        asked = opts.asked()
        if data_folder is not None:  # other data, other results: never resumed into the same report
            asked["data_folder"] = str(Path(data_folder).resolve())
        store = Store(out, manifest_for(ckpts, asked), overwrite, device_label(where))
        n_split = dm.eval_size(opts.split)
        n_images = min(n_split, opts.limit or n_split)
        for study in REGISTRY.selected(opts.studies):
            for note in study.data_notes(study.options(opts), common_of(opts), n_split):
                print(f"note: {note}", file=sys.stderr)
        rows = _evaluate(ckpts, dm, store, opts, progress)
    evaluated = {r["n"] for r in rows if "n" in r}
    if evaluated and evaluated != {n_images}:
        raise AblationError(f"internal check failed: units evaluated {sorted(evaluated)} images, expected {n_images}")
    meta = {
        "command": command,
        "split": opts.split,
        "n_images": n_images,
        "n_split": n_split,
        "devices": store.device_counts(),
        "options": asdict(opts),
        "checkpoints": [
            {
                "label": c.label,
                "path": c.path,
                "spec": c.spec.to_dict(),
                "train_metrics": c.train_metrics,
                "init": c.init,
                "sample": list(c.sample),
                "recipe": c.recipe,
            }
            for c in ckpts
        ],
    }
    plots = write_report(rows, store.out, meta)
    if wandb_project:
        log_to_wandb(rows, store.out, ckpts, opts, plots, wandb_project, samples(meta["checkpoints"])[0])
    print(f"report: {store.out / 'report.html'}")
    return store.out


def _evaluate(ckpts: list[Loaded], dm, store: Store, opts: Any, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    bar = tqdm(desc="lesion evaluations", unit="img", disable=not progress, unit_scale=True)
    for c in ckpts:
        bar.set_postfix_str(c.label)
        run_checkpoint(c, dm, store, opts, progress=bar.update, peers=ckpts)
    bar.close()
    return complete(store.rows())


def log_to_wandb(rows, out: Path, ckpts, opts, plots: dict[str, str], project: str, pools: dict[str, str]) -> None:
    """One W&B run of job_type 'ablation', grouped and tagged with the training runs. Its summary
    holds each checkpoint's `lesion/*` values under its label, and where a pool (`stats.samples`)
    has two or more, their mean under '<architecture>/mean (n = N)/'."""
    import json

    import wandb
    import yaml

    from ..train import wandb_offline

    groups = set()
    for c in ckpts:
        if c.run_dir and (Path(c.run_dir) / "config.yaml").exists():
            cfg = yaml.safe_load((Path(c.run_dir) / "config.yaml").read_text())
            groups.add((cfg.get("run") or {}).get("wandb_group") or "")
    group = next(iter(groups - {""}), None) or "ablation"
    run = wandb.init(
        project=project,
        job_type="ablation",
        group=group,
        dir=str(out),
        tags=["ablation", *[c.spec.name for c in ckpts]],
        mode="offline" if wandb_offline() else "online",
        config={"checkpoints": [c.path for c in ckpts], **asdict(opts)},
        reinit="finish_previous",
    )
    cols = sorted({k for r in rows for k in r})
    table = wandb.Table(
        columns=cols,
        data=[[json.dumps(r.get(k)) if isinstance(r.get(k), list | dict) else r.get(k) for k in cols] for r in rows],
    )
    payload = {"ablation/results": table}
    for name, file in plots.items():
        payload[f"ablation/{name}"] = wandb.Image(str(out / file))
    run.log(payload)
    by_pool = defaultdict(list)
    for c in ckpts:
        values = lesion_summary(rows, c.label)
        for k, v in values.items():
            run.summary[f"{c.label}/{k}"] = v
        if c.label in pools:
            by_pool[pools[c.label]].append(values)
    for pool, each in by_pool.items():
        for k in set.intersection(*map(set, each)) if len(each) > 1 else ():
            run.summary[f"{pool}/mean (n = {len(each)})/{k}"] = statistics.fmean(v[k] for v in each)
    run.finish()
