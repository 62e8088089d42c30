"""The GPU check: one command for a GPU node, under 9 minutes on one H100/H200. Steps run in
order of value, each in its own process under its own time limit, so a slow step cannot starve
the rest; a failed step is recorded with the end of its output and the others still run.

  1. main job: the README's `fit` (sweeps/depth.yaml + cpu-quick, 1,900 iterations) with the
     GPU defaults (bf16 autocast, the dataset kept on the GPU): test error, wall time;
  2. bench_fit on the GPU: img/s of fit vs a bare CUDA loop on pre-made tensors, and the ratio;
  3. bench_lesion and bench_paths on the GPU: shared vs naive, medians;
  4. the ViT and ConvNeXt figures (issue 25 §5): bench_fit of cifar_vit6 (with and without the
     recipe's RandAugment/Mixup/CutMix/erasing) and cifar_convnext_atto against a bare loop,
     and bench_lesion of both;
  5. the geometry studies' figures (issue 24 §6): bench_geometry landscape (ResNet-56, 1,000
     images: a grid point against a bare forward and Li et al.'s way) and hessian (ResNet-20
     and -56, 256 images: Lanczos's and power iteration's products to 1e-3, and the seconds of
     a product against a forward+backward);
  6. `resnet-lab ablate --device cuda`: every study on init:resnet20 and init:plain20 (CIFAR-10),
     then the same command on the CPU; per study, the largest relative difference of matched
     rows' values (TF32 off: float32 rounding and argmax ties are what may differ);
  7. with 2 or more GPUs: a 2-process NCCL DDP fit whose final validation must equal a
     single-process `validate` of its checkpoint.
A step whose packages the node lacks (an offline node without the wheelhouse) is refused in
one line and the others run; the exit code is then 2. Everything lands in OUT/gpu_check.json
and OUT/gpu_check.md.

    python scripts/gpu_check.py --out runs/gpu-check --data ../shared/data/cifar10-jpeg.tar.gz
    python scripts/gpu_check.py --paper --out runs/gpu-check --budget 1800   # then, optional: 64k its
    python scripts/gpu_check.py --smoke --out /tmp/gpu-check   # the same steps, tiny, on CPU (CI)
    python scripts/gpu_check.py --out runs/gpu-check --steps bench_geometry_hessian ablate_cuda  # some steps again

--paper trains ResNet-20 with the paper's full recipe (64k iterations, sweeps/depth.yaml) and
sets its test error beside He et al.'s Table 6. It first estimates its wall time from the img/s
the first command measured (OUT/gpu_check.json) and refuses when that exceeds --budget.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout: the repository's resnet_lab
SCRIPTS = REPO / "scripts"
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
FIT = ["--config", str(REPO / "sweeps/depth.yaml"), "--config", str(REPO / "sweeps/presets/cpu-quick.yaml")]
PAPER = ["--config", str(REPO / "sweeps/depth.yaml"), "--model.arch", "resnet20"]
PAPER_STEPS = 64000
# --smoke: synthetic data and a few steps, on CPU, so CI runs every step's code path in about a minute.
TINY = ["--data.init_args.source", "synthetic", "--data.init_args.val_size", "200", "--data.init_args.eval_subset",
        "100", "--data.init_args.batch_size", "32", "--trainer.max_steps", "4", "--trainer.check_val_every_n_epoch",
        "1", "--trainer.accelerator", "cpu"]  # fmt: skip
SMOKE_FAMILIES = ("vit1_i32_p8_w32_h2_m64", "convnext_cifar_d1-1-1-1_w8-8-16-16")
# Seconds each step may take on the GPU and what it imports; --budget (540 s) caps their sum.
BUDGET = {"main_job": 180, "bench_fit": 150, "bench_lesion": 60, "bench_paths": 60, "bench_fit_vit": 45,
          "bench_fit_convnext": 45, "bench_lesion_families": 45, "bench_geometry_landscape": 45,
          "bench_geometry_hessian": 60, "ablate_cuda": 90, "ddp": 150}  # fmt: skip
# Step 6: every registered study, small (a few seconds each run on a GPU node); --smoke: tinier, on CPU.
ABLATE_SIZES = {"--limit": 200, "--samples": 2, "--bn-recalib": 100, "--k-max": 2, "--adjacent-max": 2,
                "--paths-images": 32, "--probe-images": 200, "--landscape-images": 100, "--landscape-grid": 3,
                "--landscape-bn-images": 100, "--hessian-images": 32, "--hessian-max-iter": 12, "--hessian-tol": 0.05,
                "--hessian-slq": 1, "--shattered-lines": 2, "--shattered-points": 16}  # fmt: skip
ABLATE_SMOKE = {"--limit": 40, "--bn-recalib": 20, "--paths-images": 8, "--probe-images": 100, "--landscape-images": 16,
                "--landscape-bn-images": 16, "--hessian-images": 8, "--hessian-max-iter": 4,
                "--shattered-points": 4}  # fmt: skip
NEEDS = {
    "main_job": ("pytorch_lightning", "torchvision", "jsonargparse", "typeshed_client", "docstring_parser"),
    "bench_fit": ("pytorch_lightning", "torchvision"),
    "bench_lesion": ("torchvision",),
    "bench_paths": ("torchvision",),
    "bench_fit_vit": ("pytorch_lightning", "torchvision"),
    "bench_fit_convnext": ("pytorch_lightning", "torchvision"),
    "bench_lesion_families": ("torchvision",),
    "bench_geometry_landscape": ("torchvision",),
    "bench_geometry_hessian": ("torchvision",),
    "ablate_cuda": ("pytorch_lightning", "torchvision", "scipy", "matplotlib", "yaml", "tqdm"),
    "ddp": ("pytorch_lightning", "torchvision", "jsonargparse", "typeshed_client", "docstring_parser"),
}


class CheckError(Exception):
    """Bad input: one line, exit 2."""


def missing(step: str) -> list[str]:
    return [m for m in NEEDS[step] if importlib.util.find_spec(m) is None]


def refuse(step: str, absent: list[str], results: dict) -> bool:
    """Record and print a step the node cannot run; True when refused."""
    if not absent:
        return False
    why = f"needs {', '.join(absent)}, not installed here: install from the wheelhouse (README, Offline GPU nodes)"
    print(f"gpu_check: {step} refused: {why}", file=sys.stderr, flush=True)
    results[step] = {"refused": why}
    return True


def run(name: str, cmd: list[str], timeout: float, out: Path) -> dict:
    """Run one step; its output goes to OUT/NAME.log; returns rc, wall time and the output's tail."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this checkout
    print(f"gpu_check: {name} (at most {timeout:.0f} s) ...", flush=True)
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=REPO
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = (out / f"{name}.log").read_text()
    step = {"rc": rc, "wall_s": round(time.perf_counter() - t, 1), "budget_s": round(timeout)}
    step["tail"] = text[-1500:] if rc != 0 else ""
    print(f"gpu_check: {name} rc={rc} in {step['wall_s']} s", flush=True)
    return step


def last_json(log: Path) -> dict | list | None:
    """The JSON value (an object, or a list of them) that ends a benchmark's output."""
    text = log.read_text()
    for start in reversed([m.start() for m in re.finditer(r"^[{\[]", text, re.MULTILINE)]):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            continue
    return None


def final(run_dir: Path | None, key: str, folder: str = "csv") -> float | None:
    """The last logged value of `key` in a run's metrics history."""
    from resnet_lab.callbacks import read_history

    series = read_history(run_dir, (key,), folder)[key] if run_dir else []
    return series[-1][1] if series else None


def save(out: Path, results: dict) -> None:
    """gpu_check.json and .md as they stand: a step killed later loses none of the earlier ones."""
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    (out / "gpu_check.md").write_text(markdown(results))


def one_run(root: Path) -> Path | None:
    runs = sorted(p for p in root.glob("*") if (p / "run.json").is_file())
    return runs[-1] if runs else None


def fit_cmd(config: list[str], name: str, runs: Path, data: Path | None) -> list[str]:
    logger = "both" if importlib.util.find_spec("wandb") else "csv"  # offline nodes often lack wandb
    return [sys.executable, "-m", "resnet_lab.cli", "fit", *config, "--run.root", str(runs), "--run.name",
            name, "--run.logger", logger, "--trainer.enable_progress_bar", "false",
            *(["--data.init_args.folder", str(data)] if data else [])]  # fmt: skip


def scored(step: dict, run_dir: Path | None) -> dict:
    """A fit step's errors (%), read from its run's metrics history."""
    if run_dir is not None:
        step.update(test_error=final(run_dir, "test/error"), best_test_error=final(run_dir, "best_test/error"),
                    val_error=final(run_dir, "val/error"), run_dir=str(run_dir))  # fmt: skip
    return step


def main_job(out: Path, runs: Path, smoke: bool, data: Path | None, limit: float, results: dict) -> None:
    if refuse("main_job", missing("main_job"), results):
        return
    step = run("main_job", [*fit_cmd(FIT, "main", runs, data), *(TINY if smoke else [])], limit, out)
    results["main_job"] = scored(step, one_run(runs / "main"))


def benchmarks(out: Path, smoke: bool, device: str, data: Path | None, limit, results: dict, steps: set) -> None:
    size = {
        "bench_fit": ["--rounds", "1", "--steps", "2", "--warmup", "1", "--workers", "0"]
        if smoke else ["--rounds", "3", "--steps", "200", "--warmup", "30"],
        "bench_lesion": ["--models", "resnet8", "--images", "64", "--chunk", "32", "--rounds", "1"]
        if smoke else ["--models", "resnet56", "resnet110", "--images", "10000", "--chunk", "1000"],
        "bench_paths": ["--models", "preact_resnet8", "--images", "8", "--samples", "1", "--rounds", "1"]
        if smoke else ["--models", "preact_resnet56", "preact_resnet110", "--images", "256", "--samples", "2"],
    }  # fmt: skip
    # --smoke: the same steps on nets small enough for CI (a 1-layer ViT, a 4-block ConvNeXt).
    vit, cnx = SMOKE_FAMILIES if smoke else ("cifar_vit6", "cifar_convnext_atto")
    family_fit = ["--rounds", "1", "--steps", "1", "--warmup", "1", "--workers", "0"] if smoke else \
        ["--rounds", "3", "--steps", "100", "--warmup", "20"]  # fmt: skip
    size["bench_fit_vit"] = ["--arch", vit, "--baseline", "bare", "--augment", *family_fit]
    size["bench_fit_convnext"] = ["--arch", cnx, "--baseline", "bare", *family_fit]
    lesion_images = ["--images", "16", "--chunk", "16", "--rounds", "1"] if smoke else \
        ["--images", "10000", "--chunk", "1000"]  # fmt: skip
    size["bench_lesion_families"] = ["--models", vit, cnx, *lesion_images]
    size["bench_geometry_landscape"] = ["landscape", *(
        ["--model", "resnet8", "--images", "40", "--rounds", "1"] if smoke else
        ["--model", "resnet56", "--images", "1000", "--rounds", "5"])]  # fmt: skip
    size["bench_geometry_hessian"] = ["hessian", *(
        ["--models", "resnet8", "--images", "16", "--rounds", "1", "--max-iter", "40"] if smoke else
        ["--models", "resnet20", "resnet56", "--images", "256", "--rounds", "3", "--max-iter", "60"])]  # fmt: skip
    for name, args in size.items():
        if name not in steps:
            continue
        script = "_".join(name.split("_")[:2])  # a step is bench_<script>[_<what it runs on>]
        if refuse(name, missing(name), results):
            continue
        if script == "bench_fit" and not (data or ARCHIVE).exists():
            results[name] = {"refused": f"needs the CIFAR-10 archive ({ARCHIVE} is missing): pass --data"}
            print(f"gpu_check: {name} refused: {results[name]['refused']}", file=sys.stderr, flush=True)
            continue
        if script == "bench_fit" and data:
            args = [*args, "--archive", str(data)]
        step = run(name, [sys.executable, str(SCRIPTS / f"{script}.py"), "--device", device, *args], limit(name), out)
        step["result"] = last_json(out / f"{name}.log")
        results[name] = step
        save(out, results)


def ablate_check(out: Path, smoke: bool, data: Path | None, limit, results: dict) -> None:
    """Step 6: every study through `resnet-lab ablate --device cuda` and the same on the CPU,
    their rows compared (--smoke: the CPU run alone, tiny)."""
    name = "ablate_cuda"
    if refuse(name, missing(name), results):
        return
    archive = data or ARCHIVE
    if not archive.exists():
        results[name] = {"refused": f"needs the CIFAR-10 archive ({archive} is missing): pass --data"}
        print(f"gpu_check: {name} refused: {results[name]['refused']}", file=sys.stderr, flush=True)
        return
    from resnet_lab.ablation.studies import REGISTRY

    # --smoke: the smallest nets every study serves (reorder needs two blocks of a stage's shape)
    nets = ["init:resnet14", "init:plain14"] if smoke else ["init:resnet20", "init:plain20"]
    sizes = {**ABLATE_SIZES, **(ABLATE_SMOKE if smoke else {})}  # --smoke: the studies run, not a comparison
    args = [*nets, "--studies", *REGISTRY.names, *(str(x) for kv in sizes.items() for x in kv),
            "--data-folder", str(archive), "--overwrite", "--no-progress"]  # fmt: skip
    cmd = [sys.executable, "-m", "resnet_lab.cli", "ablate", *args]
    device = "cpu" if smoke else "cuda"
    step = run(name, [*cmd, "--device", device, "--out", str(out / f"ablate-{device}")], limit(name), out)
    if step["rc"] == 0 and not smoke:
        step["cpu"] = run(f"{name}_cpu", [*cmd, "--device", "cpu", "--out", str(out / "ablate-cpu")], limit(name), out)
        if step["cpu"]["rc"] != 0:
            step["rc"] = f"the CPU run: {step['cpu']['rc']}"  # a failed step all the same
        else:
            rows = [json.loads((out / f"ablate-{d}" / "results.json").read_text()) for d in ("cuda", "cpu")]
            step["result"] = compare_rows(*rows)
    results[name] = step


def compare_rows(a: list[dict], b: list[dict]) -> dict:
    """Per study: rows matched by (checkpoint, study, condition, key), how many matched, how many
    of `a` found no twin in `b`, and the largest and median relative difference of their numeric
    values, with the value that differs most."""
    import statistics

    def key(r: dict) -> tuple:
        return r.get("checkpoint"), r.get("study"), r.get("condition"), r.get("key")

    twins = {key(r): r for r in b}
    out: dict[str, dict] = {}
    for r in a:
        s = out.setdefault(r["study"], {"rows": 0, "unmatched": 0, "rel": [], "max_rel": 0.0, "worst": None})
        other = twins.get(key(r))
        if other is None:
            s["unmatched"] += 1
            continue
        s["rows"] += 1
        for field, v in r.items():
            w = other.get(field)
            if not (number(v) and number(w)) or (v != v and w != w):  # NaN in both: the same
                continue
            rel = abs(v - w) / max(abs(v), abs(w), 1e-12)
            s["rel"].append(rel)
            if rel > s["max_rel"]:
                s["max_rel"], s["worst"] = rel, f"{r.get('key')} {field}: {v:.6g} vs {w:.6g}"
    for s in out.values():
        s["median_rel"] = statistics.median(s.pop("rel")) if s["rows"] else None
    return out


def number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def ddp_check(out: Path, runs: Path, smoke: bool, gpus: int, limit: float, results: dict) -> None:
    """A 2-process DDP fit, then a single-process validate of its checkpoint: equal val/error."""
    if gpus < 2 and not smoke:
        results["ddp"] = {"skipped": f"{gpus} GPU(s) visible; the DDP check needs 2"}
        return
    if refuse("ddp", missing("ddp"), results):
        return
    devices = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    steps = [] if smoke else ["--trainer.max_steps", "300", "--trainer.check_val_every_n_epoch", "1"]
    common = ["--run.root", str(runs), "--run.name", "ddp", "--run.logger", "csv",
              "--trainer.enable_progress_bar", "false", *(TINY if smoke else [])]  # fmt: skip
    step = run("ddp_fit", [sys.executable, "-m", "resnet_lab.cli", "fit", *FIT, *common, *devices, *steps], limit, out)
    run_dir = one_run(runs / "ddp")
    if run_dir is not None and step["rc"] == 0:
        single = ["--trainer.devices", "1", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
        cmd = [sys.executable, "-m", "resnet_lab.cli", "validate", *FIT, *common, *single]
        step["validate"] = run("ddp_validate", cmd, 120, out)
        ddp, one = final(run_dir, "val/error"), final(run_dir, "val/error", "csv-validate")
        step.update(ddp_val_error=ddp, single_val_error=one, equal=ddp is not None and ddp == one)
    results["ddp"] = step


def paper_estimate(out: Path, steps: int, batch: int) -> dict:
    """Seconds the 64k-iteration run should take, from the first command's bench_fit img/s."""
    path = out / "gpu_check.json"
    if not path.is_file():
        raise CheckError(f"--paper estimates its time from the first command's results: run it first with --out {out}")
    step = json.loads(path.read_text()).get("bench_fit", {})
    img_s = ((step.get("result") or {}).get("median_img_per_s") or {}).get("fit")
    if not img_s:
        raise CheckError(f"{path} has no bench_fit img/s to estimate from: rerun the first command")
    train = steps * batch / img_s
    # + one 5,000-image validation per epoch (~352 steps; about 2% of an epoch's time) and start-up
    basis = f"{steps} x {batch} / bench_fit img/s x 1.05 + 60 s"
    if "earlier" in step:  # kept from another run by --steps: its device may not be this one
        basis += f" (bench_fit measured on {step['earlier']})"
    return {"img_per_s": img_s, "estimate_s": round(train * 1.05 + 60), "basis": basis}


def paper_run(out: Path, runs: Path, smoke: bool, data: Path | None, budget: float) -> dict:
    from resnet_lab.models.registry import model_meta

    est = paper_estimate(out, 4 if smoke else PAPER_STEPS, 32 if smoke else 128)
    print(f"gpu_check: the paper's run should take about {est['estimate_s'] / 60:.1f} min "
          f"({est['basis']}, {est['img_per_s']:.0f} img/s)", flush=True)  # fmt: skip
    if est["estimate_s"] > budget:
        raise CheckError(f"the estimate ({est['estimate_s']} s) exceeds --budget {budget:.0f} s: give a larger one")
    if refuse("paper", missing("main_job"), {}):
        return {"refused": "missing packages", **est}
    step = run("paper", [*fit_cmd(PAPER, "paper", runs, data), *(TINY if smoke else [])], budget, out)
    paper = model_meta("resnet20").paper
    return {**scored(step, one_run(runs / "paper")), **est, "paper_error": paper.error, "paper": paper.label()}


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# GPU check ({env['device']}, torch {env['torch']}, {env['date']})", ""]
    lines += ["| step | rc | wall (s) | budget (s) | result |", "| --- | --- | ---: | ---: | --- |"]
    for name, step in results.items():
        if name == "environment":
            continue
        if "skipped" in step or "refused" in step:
            lines.append(f"| {name} | - | - | - | {'skipped' if 'skipped' in step else 'refused'}: "
                         f"{step.get('skipped') or step['refused']} |")  # fmt: skip
            continue
        keys = ("test_error", "best_test_error", "val_error", "paper_error", "estimate_s",
                "ddp_val_error", "single_val_error", "equal")  # fmt: skip
        shown = {k: step[k] for k in ("earlier", *keys) if k in step}
        if step.get("result"):
            shown.update(figures(step["result"]))
        cells = [name, step["rc"], step["wall_s"], step.get("budget_s", ""), f"`{json.dumps(shown)}`"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def figures(result: dict | list) -> dict:
    """The figures of a benchmark's result that the table shows."""
    keys = ("median_img_per_s", "ratio_vs_baseline", "median", "study_over_bare", "study_over_reference")
    if isinstance(result, dict) and result and all(isinstance(v, dict) and "max_rel" in v for v in result.values()):
        return {study: f"{v['max_rel']:.1e} ({v['rows']} rows)" for study, v in result.items()}  # ablate_cuda
    if isinstance(result, list):  # bench_geometry hessian: one row per net
        per_net = ("lanczos_products_to_tol", "power_products_to_tol", "product_over_forward_backward",
                   "block_product_over_forward_backward")  # fmt: skip
        return {row["model"]: {k: row[k] for k in per_net if k in row} for row in result}
    return {k: result[k] for k in keys if k in result}


def out_folder(path: str, flag: str = "--out") -> Path:
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise CheckError(f"{flag} {path} is a file: give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise CheckError(f"{flag} {path} cannot be written ({e.strerror or e}): give a writable folder") from None
    return out


def data_path(path: str | None, smoke: bool) -> Path | None:
    if path is None:
        return None if smoke or not ARCHIVE.exists() else ARCHIVE
    data = Path(path).expanduser().resolve()
    if not data.exists():
        raise CheckError(f"--data {path} does not exist: give the CIFAR-10 archive (cifar10-jpeg.tar.gz) or folder")
    return data


def environment(smoke: bool, gpus: int) -> dict:
    import torch

    return {
        "device": "cpu (smoke)" if smoke else f"{gpus} x {torch.cuda.get_device_name()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def check(args, out: Path, runs: Path, data: Path | None, gpus: int) -> dict:
    """The first command: every step, each under min(its budget, what --budget leaves)."""
    scale = 3 if args.smoke else 1  # CPU smoke steps start slower than GPU steps train
    deadline = time.monotonic() + args.budget * scale

    def limit(step: str) -> float:
        return max(1.0, min(BUDGET[step] * scale, deadline - time.monotonic()))

    steps = set(args.steps or BUDGET)
    results: dict = {"environment": environment(args.smoke, gpus)}
    results.update(earlier(out, steps))  # what this run does not repeat stays (--paper's run too)
    if "main_job" in steps:
        main_job(out, runs, args.smoke, data, limit("main_job"), results)
        save(out, results)
    benchmarks(out, args.smoke, "cpu" if args.smoke else "cuda", data, limit, results, steps)
    if "ablate_cuda" in steps:
        ablate_check(out, args.smoke, data, limit, results)
        save(out, results)
    if "ddp" in steps:
        ddp_check(out, runs, args.smoke, gpus, limit("ddp"), results)
    return results


def earlier(out: Path, steps: set) -> dict:
    """The results of OUT/gpu_check.json that this run does not repeat (the steps --steps leaves
    out, and --paper's run), each marked with the device and date of the run that measured it."""
    path = out / "gpu_check.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    env = old.pop("environment", {})
    when = f"{env.get('device', '?')}, {env.get('date', '?')}"
    return {name: {"earlier": when, **step} for name, step in old.items() if name not in steps}


def main() -> int:
    from resnet_lab.errors import ArgumentParser  # a bad flag or value: one line, exit 2

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json, gpu_check.md and the logs")
    p.add_argument("--runs", help="folder for the fits' run directories (default OUT/runs)")
    p.add_argument("--data", help=f"the CIFAR-10 archive or folder (default {ARCHIVE} when present)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together (default 540)")
    p.add_argument("--smoke", action="store_true", help="the same steps, tiny, on CPU")
    p.add_argument("--paper", action="store_true", help="the optional 64k-iteration ResNet-20 run (after the check)")
    p.add_argument("--steps", nargs="+", choices=list(BUDGET), metavar="STEP",
                   help=f"only these steps ({', '.join(BUDGET)}); the others' results in OUT stay, marked as "
                   "an earlier run's")  # fmt: skip
    args = p.parse_args()
    try:
        if not args.budget > 0 or args.budget == float("inf"):
            raise CheckError(f"--budget {args.budget}: give a positive number of seconds")
        out, data = out_folder(args.out), data_path(args.data, args.smoke)
        runs = out_folder(args.runs, "--runs") if args.runs else out / "runs"
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not gpus and not args.smoke:
            raise CheckError("no CUDA GPU is visible; run with --smoke to check the steps on CPU")
        if args.paper and args.steps:
            raise CheckError("--steps selects steps of the check; --paper is a run of its own: give one of them")
        if args.paper:
            results = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else {}
            results["paper"] = paper_run(out, runs, args.smoke, data, args.budget)
        else:
            results = check(args, out, runs, data, gpus)
    except CheckError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    save(out, results)
    print(markdown(results))
    now = {k: v for k, v in results.items() if isinstance(v, dict) and "earlier" not in v}  # this run's steps
    failed = [k for k, v in now.items() if v.get("rc", 0) not in (0, None)]
    failed += ["ddp (val/error differs)"] if results.get("ddp", {}).get("equal") is False else []
    refused = [k for k, v in now.items() if "refused" in v]
    if failed:
        print(f"gpu_check: failed steps: {', '.join(failed)} (logs in {out})", file=sys.stderr)
    if refused:
        print(f"gpu_check: refused steps: {', '.join(refused)} (the others ran)", file=sys.stderr)
    return 1 if failed else 2 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
