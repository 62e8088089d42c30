"""The GPU check: one command to run as is on the first GPU machine (about 10 minutes on
one H100/H200). Each step runs in its own process with a time limit; a failed step is
recorded with the end of its output and the others still run.

  1. main job: the README's `fit` (sweeps/depth.yaml + cpu-quick, 1,900 iterations) with
     the GPU defaults (bf16 autocast, the dataset kept on the GPU): test accuracy, wall time;
  2. bench_fit on the GPU: img/s of fit vs a bare CUDA loop on pre-made tensors, and the ratio;
  3. bench_lesion and bench_paths on the GPU: shared vs naive, medians;
  4. with 2 or more GPUs: a 2-process NCCL DDP fit whose final validation must equal a
     single-process `validate` of its checkpoint.
Everything lands in OUT/gpu_check.json and OUT/gpu_check.md.

    python scripts/gpu_check.py --out runs/gpu-check
    python scripts/gpu_check.py --smoke --out /tmp/gpu-check   # the same steps, tiny, on CPU (CI)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
FIT = ["--config", str(REPO / "sweeps/depth.yaml"), "--config", str(REPO / "sweeps/presets/cpu-quick.yaml")]
# --smoke: synthetic data and a few steps, on CPU, so CI runs every step's code path in about a minute.
TINY = ["--data.init_args.source", "synthetic", "--data.init_args.val_size", "200", "--data.init_args.eval_subset",
        "100", "--data.init_args.batch_size", "32", "--trainer.max_steps", "4", "--trainer.check_val_every_n_epoch",
        "1", "--trainer.accelerator", "cpu"]  # fmt: skip


def run(name: str, cmd: list[str], timeout: int, out: Path) -> dict:
    """Run one step; its output goes to OUT/NAME.log; returns rc, wall time and the output's tail."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=REPO
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = (out / f"{name}.log").read_text()
    return {"rc": rc, "wall_s": round(time.perf_counter() - t, 1), "tail": text[-1500:] if rc != 0 else ""}


def last_json(log: Path) -> dict | None:
    """The JSON object a benchmark prints last."""
    text = log.read_text()
    start = text.rfind("\n{")
    try:
        return json.loads(text[start + 1 :]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def final(run_dir: Path, key: str, folder: str = "csv") -> float | None:
    """The last logged value of `key` in a run's metrics.csv."""
    path = run_dir / folder / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        values = [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]
    return values[-1] if values else None


def one_run(root: Path) -> Path | None:
    runs = sorted(p for p in root.glob("*") if (p / "run.json").is_file())
    return runs[-1] if runs else None


def main_job(out: Path, smoke: bool, results: dict) -> None:
    cmd = [sys.executable, "-m", "resnet_lab.cli", "fit", *FIT, "--run.root", str(out / "runs"), "--run.name", "main",
           "--trainer.enable_progress_bar", "false", *(TINY if smoke else [])]  # fmt: skip
    step = run("main_job", cmd, 600 if not smoke else 300, out)
    run_dir = one_run(out / "runs" / "main")
    if run_dir is not None:
        step.update(test_acc=final(run_dir, "test/acc"), best_test_error=final(run_dir, "best_test/error"))
        step["run_dir"] = str(run_dir)
    results["main_job"] = step


def benchmarks(out: Path, smoke: bool, device: str, results: dict) -> None:
    size = {
        "bench_fit": ["--rounds", "1", "--steps", "2", "--warmup", "1", "--workers", "0"]
        if smoke else ["--rounds", "3", "--steps", "200", "--warmup", "30"],
        "bench_lesion": ["--models", "resnet8", "--images", "64", "--chunk", "32", "--rounds", "1"]
        if smoke else ["--models", "resnet56", "resnet110", "--images", "10000", "--chunk", "1000"],
        "bench_paths": ["--models", "preact_resnet8", "--images", "8", "--samples", "1", "--rounds", "1"]
        if smoke else ["--models", "preact_resnet56", "preact_resnet110", "--images", "256", "--samples", "2"],
    }  # fmt: skip
    for name, args in size.items():
        step = run(name, [sys.executable, str(SCRIPTS / f"{name}.py"), "--device", device, *args], 300, out)
        step["result"] = last_json(out / f"{name}.log")
        results[name] = step


def ddp_check(out: Path, smoke: bool, gpus: int, results: dict) -> None:
    """A 2-process DDP fit, then a single-process validate of its checkpoint: equal val/error."""
    if gpus < 2 and not smoke:
        results["ddp"] = {"skipped": f"{gpus} GPU(s) visible; the DDP check needs 2"}
        return
    devices = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    steps = [] if smoke else ["--trainer.max_steps", "300", "--trainer.check_val_every_n_epoch", "1"]
    common = ["--run.root", str(out / "runs"), "--run.name", "ddp", "--run.logger", "csv",
              "--trainer.enable_progress_bar", "false", *(TINY if smoke else [])]  # fmt: skip
    step = run("ddp_fit", [sys.executable, "-m", "resnet_lab.cli", "fit", *FIT, *common, *devices, *steps], 600, out)
    run_dir = one_run(out / "runs" / "ddp")
    if run_dir is not None and step["rc"] == 0:
        single = ["--trainer.devices", "1", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
        cmd = [sys.executable, "-m", "resnet_lab.cli", "validate", *FIT, *common, *single]
        step["validate"] = run("ddp_validate", cmd, 300, out)
        ddp, one = final(run_dir, "val/error"), final(run_dir, "val/error", "csv-validate")
        step.update(ddp_val_error=ddp, single_val_error=one, equal=ddp is not None and ddp == one)
    results["ddp"] = step


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# GPU check ({env['device']}, torch {env['torch']}, {env['date']})", ""]
    lines += ["| step | rc | wall (s) | result |", "| --- | --- | ---: | --- |"]
    for name, step in results.items():
        if name == "environment":
            continue
        if "skipped" in step:
            lines.append(f"| {name} | - | - | skipped: {step['skipped']} |")
            continue
        keys = ("test_acc", "best_test_error", "ddp_val_error", "single_val_error", "equal")
        shown = {k: step[k] for k in keys if k in step}
        if step.get("result"):
            r = step["result"]
            shown.update({k: r[k] for k in ("median_img_per_s", "ratio_vs_baseline", "median") if k in r})
        lines.append(f"| {name} | {step['rc']} | {step['wall_s']} | `{json.dumps(shown)}` |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json, gpu_check.md and the logs")
    p.add_argument("--smoke", action="store_true", help="the same steps, tiny, on CPU")
    args = p.parse_args()
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not args.smoke:
        print("gpu_check: no CUDA GPU is visible; run with --smoke to check the steps on CPU", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    results: dict = {
        "environment": {
            "device": "cpu (smoke)" if args.smoke else f"{gpus} x {torch.cuda.get_device_name()}",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    }
    main_job(out, args.smoke, results)
    benchmarks(out, args.smoke, device, results)
    ddp_check(out, args.smoke, gpus, results)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    (out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("rc", 0) not in (0, None)]
    failed += ["ddp (val/error differs)"] if results["ddp"].get("equal") is False else []
    if failed:
        print(f"gpu_check: failed steps: {', '.join(failed)} (logs in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
