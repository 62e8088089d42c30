"""scripts/gpu_check.py --smoke: every step of the GPU check runs, tiny, on CPU, so the
script is ready (and cannot rot) for the next GPU machine."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = str(REPO / "scripts" / "gpu_check.py")


def gpu_check(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_then_the_paper_run(tmp_path):
    out = tmp_path / "gc"
    r = gpu_check("--smoke", "--out", str(out), "--runs", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert {"main_job", "bench_fit", "bench_lesion", "bench_paths", "bench_fit_vit", "bench_fit_convnext",
            "bench_lesion_families", "bench_geometry_landscape", "bench_geometry_hessian", "ablate_cuda",
            "ddp"} <= set(res)  # fmt: skip
    report = (out / "ablate-cpu" / "report.md").read_text()  # every study through `ablate --device`
    assert res["ablate_cuda"]["rc"] == 0 and "Computed on: cpu (" in report and "Hessian" in report
    land, (hess,) = res["bench_geometry_landscape"]["result"], res["bench_geometry_hessian"]["result"]
    assert land["model"] == "resnet8" and land["study_over_reference"] > 0 and land["device"] == "cpu"
    assert hess["model"] == "resnet8" and 1 <= hess["lanczos_products_to_tol"] <= hess["power_ran"]
    vit = res["bench_fit_vit"]["result"]
    assert vit["arch"] == "vit1_i32_p8_w32_h2_m64" and set(vit["ratio_vs_baseline"]) == {"fit", "fit+augment"}
    assert res["bench_fit_convnext"]["result"]["arch"] == "convnext_cifar_d1-1-1-1_w8-8-16-16"
    assert set(res["bench_lesion_families"]["result"]["median"]) == {"vit1_i32_p8_w32_h2_m64",
                                                                     "convnext_cifar_d1-1-1-1_w8-8-16-16"}  # fmt: skip
    main = res["main_job"]
    assert main["rc"] == 0 and 0 <= main["test_error"] <= 100 and main["budget_s"] > 0
    assert main["run_dir"].startswith(str(tmp_path / "runs"))  # --runs: the fits' directories, apart from OUT
    assert res["bench_fit"]["result"]["ratio_vs_baseline"]["fit"] > 0
    assert res["bench_lesion"]["result"]["median"]["resnet8"]["ratio"] > 0
    assert res["bench_paths"]["result"]["median"]["preact_resnet8"]["routings"] == 4
    ddp = res["ddp"]
    assert ddp["equal"] is True and ddp["ddp_val_error"] == ddp["single_val_error"]  # 2 processes = 1 process
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (cpu (smoke)") and "| ddp | 0 |" in md and "test_error" in md
    assert '"resnet8": {"lanczos_products_to_tol"' in md and '"study_over_reference"' in md  # the geometry rows
    # The optional second command: estimated from bench_fit's img/s, then run beside Table 6's number.
    r = gpu_check("--smoke", "--paper", "--out", str(out), "--runs", str(tmp_path / "runs"), "--budget", "600")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    paper = json.loads((out / "gpu_check.json").read_text())["paper"]
    img_s = res["bench_fit"]["result"]["median_img_per_s"]["fit"]
    assert paper["estimate_s"] == round(4 * 32 / img_s * 1.05 + 60) and paper["paper_error"] == 8.75
    assert paper["rc"] == 0 and 0 <= paper["test_error"] <= 100
    r = gpu_check("--smoke", "--paper", "--out", str(out), "--budget", "10")  # the estimate does not fit
    assert r.returncode == 2 and "exceeds --budget 10" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_steps_the_node_lacks_packages_for_are_refused_and_the_others_run(tmp_path):
    hide = tmp_path / "hide"  # a node without jsonargparse (no wheelhouse installed)
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['jsonargparse'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(hide)}
    out = tmp_path / "gc"
    out.mkdir()  # an earlier run's results: --steps repeats some steps and keeps the others, marked
    earlier = {"environment": {"device": "1 x NVIDIA H200", "torch": "2.11.0", "date": "2026-12-04 10:00"},
               "bench_fit": {"rc": 0, "wall_s": 75.0, "result": {"median_img_per_s": {"fit": 6521.0}}},
               "bench_lesion": {"rc": 1, "wall_s": 3.0, "tail": "an earlier failure"},
               "paper": {"rc": 0, "wall_s": 1400.0, "test_error": 8.6}}  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(earlier))
    r = gpu_check("--smoke", "--out", str(out), "--steps", "main_job", "bench_lesion", "ablate_cuda", "ddp", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert "main_job refused: needs jsonargparse" in r.stderr and "ddp refused: needs jsonargparse" in r.stderr
    res = json.loads((out / "gpu_check.json").read_text())
    assert "refused" in res["main_job"] and "refused" in res["ddp"]
    assert res["bench_lesion"]["rc"] == 0 and "earlier" not in res["bench_lesion"]  # repeated: this run's
    assert res["ablate_cuda"]["rc"] == 0  # every study runs without jsonargparse
    for name in ("bench_fit", "paper"):  # kept, with where and when they were measured
        assert res[name] == {"earlier": "1 x NVIDIA H200, 2026-12-04 10:00", **earlier[name]}
    assert not {"bench_paths", "bench_fit_vit", "bench_geometry_hessian"} & set(res)  # not asked for
    assert (
        '| bench_fit | 0 | 75.0 |  | `{"earlier": "1 x NVIDIA H200, 2026-12-04 10:00"'
        in (out / "gpu_check.md").read_text()
    )


def test_gpu_check_without_a_gpu_says_to_use_smoke(tmp_path):
    r = gpu_check("--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--smoke" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--out", "/proc/gpu-check"], "cannot be written"),
    (["--out", "FILE"], "is a file"),
    (["--data", "/nonexistent/cifar.tar.gz"], "does not exist"),
    (["--budget", "0"], "positive number of seconds"),
    (["--budget", "nan"], "positive number of seconds"),
    (["--paper"], "run it first"),
    (["--steps", "bench_fit", "--paper"], "give one of them"),
    (["--steps", "bench_fitt"], "invalid choice: 'bench_fitt'"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, words):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "gc")]
    r = gpu_check("--smoke", *out, *args)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_compare_rows_matches_twins_and_finds_the_largest_difference():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    row = {"checkpoint": "a", "study": "hessian", "condition": "eval-bn", "converged": True, "n": 8}
    cuda = [
        {**row, "key": "all top1", "value": 10.0, "residual": 0.0},
        {**row, "key": "all trace", "value": 200.0},
        {**row, "key": "only here", "value": 1.0},
        {**row, "study": "shattered", "key": "lag1", "corr": float("nan")},
    ]
    cpu = [{**row, "key": "all top1", "value": 10.01, "residual": 0.0}, {**row, "key": "all trace", "value": 200.0},
           {**row, "study": "shattered", "key": "lag1", "corr": float("nan")}]  # fmt: skip
    out = gc.compare_rows(cuda, cpu)
    h = out["hessian"]
    assert h["rows"] == 2 and h["unmatched"] == 1 and h["max_rel"] == pytest.approx(0.01 / 10.01)
    assert h["worst"] == "all top1 value: 10 vs 10.01" and h["median_rel"] == 0.0
    assert out["shattered"] == {"rows": 1, "unmatched": 0, "max_rel": 0.0, "worst": None, "median_rel": 0.0}
