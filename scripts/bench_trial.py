"""Per-trial overhead: process start to the first training step of `resnet-lab fit`,
with a warm data cache (the cost every sweep trial pays before it learns anything).

    python scripts/bench_trial.py --rounds 5 [--loggers csv wandb] [--baseline-src /tmp/old]

Each round starts a fresh fit process on the CIFAR-10 archive (ResNet-20, one step):
this script re-run as `--child MARK fit ...`, which is `resnet-lab fit` (its restart with
the malloc setting included) plus a callback that writes the wall time of the first
training batch to MARK. Median over rounds, per logger.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def child(mark: str, argv: list[str]) -> None:
    """`resnet-lab fit` with a callback that marks the first training batch; it restarts itself
    once with the malloc setting first, as the `resnet-lab` command does."""
    from resnet_lab.cli import _reexec_with_malloc_tunables

    _reexec_with_malloc_tunables()
    from pytorch_lightning.callbacks import Callback

    from resnet_lab.train import cli_main

    class FirstStepMark(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not Path(mark).exists():
                Path(mark).write_text(repr(time.time()))

    cli_main(argv, extra_callbacks=[FirstStepMark()])


def one(logger: str, tmp: Path, src: Path = REPO) -> float:
    mark = tmp / "first_step"
    mark.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # as a user's shell: the child sets it
    env["WANDB_MODE"], env["PYTHONPATH"] = "offline", str(src)  # src: this checkout, or --baseline-src
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(mark),
            "fit",
            "--config",
            str(REPO / "sweeps/depth.yaml"),
            "--data.init_args.folder",
            str(ARCHIVE),
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--run.test_after_fit",
            "false",
            "--run.logger",
            logger,
            "--run.root",
            str(tmp / "runs"),
            "--trainer.enable_progress_bar",
            "false",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return float(mark.read_text()) - t0


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loggers", nargs="+", default=["none", "csv", "wandb"])
    p.add_argument("--baseline-src", type=Path, help="another checkout (git worktree), timed beside this one")
    args = p.parse_args()
    if args.baseline_src and not (args.baseline_src / "resnet_lab" / "train.py").is_file():
        p.error(f"--baseline-src {args.baseline_src} holds no resnet_lab/train.py: pass a checkout of the repository")
    ways = {lg: (lg, REPO) for lg in args.loggers}
    if args.baseline_src:
        ways.update({f"{lg} (baseline)": (lg, args.baseline_src) for lg in args.loggers})
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        one("none", tmp)  # warms the data cache (first decode ~10 s) and the page cache
        res = {name: [] for name in ways}
        for r in range(args.rounds):
            for name, (lg, src) in ways.items():
                res[name].append(one(lg, tmp, src))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in res.items()), flush=True)
    print(
        json.dumps(
            {"start_to_first_step_s_median": {k: round(statistics.median(v), 2) for k, v in res.items()}}, indent=2
        )
    )


if __name__ == "__main__":
    main()
