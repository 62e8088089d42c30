"""`resnet-lab ablate`: lesion studies on one or more checkpoints, written as a report.

    resnet-lab ablate runs/resnet20/*/checkpoints/last.ckpt runs/plain20/*/checkpoints/last.ckpt \\
        --out reports/r20-vs-p20 --studies single k reorder responses --k-max 5 --samples 10
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from ..errors import UserError, count
from .report import PLOTS, complete_paths, lesion_summary, write_report
from .runner import (
    SPLITS,
    STUDIES,
    AblationError,
    Store,
    StudyOptions,
    UnitRunner,
    build_datamodule,
    check_blocks,
    check_compatible,
    load_checkpoints,
    manifest_for,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resnet-lab ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="checkpoints written by `resnet-lab fit` (e.g. a resnet and its plain twin), or torchvision weights: "
        "torchvision:resnet50 (the local torch hub cache, never downloaded), torchvision:resnet50=FILE, or a "
        "state-dict FILE",
    )
    p.add_argument("--out", required=True, help="report directory (resumable; refuses a different configuration)")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--studies", nargs="+", choices=STUDIES, default=["single", "k", "responses"])
    p.add_argument(
        "--blocks",
        nargs="+",
        default=None,
        metavar="NAME",
        help="removable blocks for the single and k studies (default: all; see model.block_names)",
    )
    p.add_argument("--k-max", type=count(1), default=5, help="k-block lesion: k = 1..K")
    p.add_argument("--samples", type=count(1), default=10, help="random subsets / permutations per k or swap level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=count(1), default=None, help="use only the first N images of the split")
    p.add_argument("--batch-size", type=count(1), default=500, help="images per chunk (bounds memory)")
    p.add_argument(
        "--bn-recalib",
        type=count(1),
        default=None,
        metavar="N",
        help="also report single-block removal with BN re-estimated on N training images",
    )
    p.add_argument(
        "--paths-images",
        type=count(1),
        default=256,
        metavar="N",
        help="paths study: images of the split to measure routed gradients on (--samples routings per length)",
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


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        run(args, argv)
    except UserError as e:
        print(f"resnet-lab ablate: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    with torch.no_grad():  # scoped: an in-process sweep goes on to train
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> Path:
    ckpts = load_checkpoints(args.checkpoints)
    check_compatible(ckpts)
    if ckpts[0].pretrained and args.data_folder is None:
        raise AblationError(
            f"{ckpts[0].label} carries no data location: pass --data-folder with an ImageNet-layout folder "
            "(val/<wnid>/..., or the val folder itself)"
        )
    opts = StudyOptions(
        split=args.split,
        studies=tuple(args.studies),
        blocks=tuple(args.blocks) if args.blocks else None,
        k_max=args.k_max,
        samples=args.samples,
        seed=args.seed,
        limit=args.limit,
        bn_recalib=args.bn_recalib,
        paths_images=args.paths_images,
    )
    if "paths" in opts.studies and all(c.spec.plain for c in ckpts):
        raise AblationError(
            "--studies paths needs a residual net: every checkpoint given is plain (one path, no skips); "
            "add a residual checkpoint or drop 'paths'"
        )
    for c in ckpts:
        n = len(check_blocks(c.model, args.blocks))
        if "k" in opts.studies and opts.k_max > n:
            raise AblationError(f"--k-max {opts.k_max} exceeds the {n} removable blocks of {c.spec.name}")
    dm = build_datamodule(
        ckpts[0].data,
        folder=args.data_folder,
        augment=False,
        eval_batch_size=args.batch_size,
        batch_size=args.batch_size,
    )
    dm.setup("test")
    check_compatible(ckpts, dm.num_classes)
    keys = ("split", "studies", "blocks", "k_max", "samples", "seed", "limit", "bn_recalib", "paths_images")
    asked = {k: getattr(args, k) for k in keys if k != "paths_images" or "paths" in opts.studies}
    asked["bn_recalib"] = args.bn_recalib or 0  # as reports before --bn-recalib became optional stored it
    if args.data_folder is not None:  # other data, other results: never resumed into the same report
        asked["data_folder"] = str(Path(args.data_folder).resolve())
    store = Store(Path(args.out), manifest_for(ckpts, asked), args.overwrite)
    out = store.out
    n_split = dm.eval_size(args.split)
    n_images = min(n_split, args.limit or n_split)
    if "paths" in opts.studies and args.paths_images > n_split:
        print(
            f"note: --paths-images {args.paths_images} exceeds the {n_split} images of the {args.split} split; "
            f"the paths study measures on all {n_split} (the report says so)",
            file=sys.stderr,
        )

    from tqdm.auto import tqdm

    bar = tqdm(desc="lesion evaluations", unit="img", disable=args.no_progress, unit_scale=True)
    for c in ckpts:
        bar.set_postfix_str(c.label)
        UnitRunner(c, dm, store, opts, progress=bar.update).run()
    bar.close()
    rows = complete_paths(store.rows())
    evaluated = {r["n"] for r in rows if "n" in r}
    if evaluated and evaluated != {n_images}:
        raise AblationError(f"internal check failed: units evaluated {sorted(evaluated)} images, expected {n_images}")
    meta = {
        "command": "resnet-lab ablate " + shlex.join(argv),
        "split": args.split,
        "n_images": n_images,
        "bn_recalib": args.bn_recalib,
        "paths": {"images": min(n_split, args.paths_images), "samples": args.samples, "seed": args.seed},
        "checkpoints": [
            {"label": c.label, "path": c.path, "spec": c.spec.to_dict(), "train_metrics": c.train_metrics}
            for c in ckpts
        ],
    }
    write_report(rows, out, meta)
    if args.wandb:
        log_to_wandb(rows, out, ckpts, args)
    print(f"report: {out / 'report.html'}")
    return out


def log_to_wandb(rows, out: Path, ckpts, args) -> None:
    """One W&B run of job_type 'ablation', grouped and tagged with the training runs."""
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
        project=args.wandb_project,
        job_type="ablation",
        group=group,
        dir=str(out),
        tags=["ablation", *[c.spec.name for c in ckpts]],
        mode="offline" if wandb_offline() else "online",
        config={
            "checkpoints": [c.path for c in ckpts],
            "split": args.split,
            "studies": args.studies,
            "k_max": args.k_max,
            "samples": args.samples,
            "seed": args.seed,
        },
        reinit="finish_previous",
    )
    cols = sorted({k for r in rows for k in r})
    table = wandb.Table(
        columns=cols,
        data=[[json.dumps(r.get(k)) if isinstance(r.get(k), list | dict) else r.get(k) for k in cols] for r in rows],
    )
    payload = {"ablation/results": table}
    for study, name in PLOTS.items():
        if (out / name).exists():
            payload[f"ablation/{study}"] = wandb.Image(str(out / name))
    run.log(payload)
    for c in ckpts:
        for k, v in lesion_summary(rows, c.label).items():
            run.summary[f"{c.spec.name}/{k}"] = v
    run.finish()
