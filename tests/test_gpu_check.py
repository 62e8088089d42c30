"""scripts/gpu_check.py --smoke: every step of the GPU check runs, tiny, on CPU, so the
script is ready (and cannot rot) for the first GPU machine."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step(tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert {"main_job", "bench_fit", "bench_lesion", "bench_paths", "ddp"} <= set(res)
    assert res["main_job"]["rc"] == 0 and 0 <= res["main_job"]["test_acc"] <= 100
    assert res["bench_fit"]["result"]["ratio_vs_baseline"]["fit"] > 0
    assert res["bench_lesion"]["result"]["median"]["resnet8"]["ratio"] > 0
    assert res["bench_paths"]["result"]["median"]["preact_resnet8"]["routings"] == 4
    ddp = res["ddp"]
    assert ddp["equal"] is True and ddp["ddp_val_error"] == ddp["single_val_error"]  # 2 processes = 1 process
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (cpu (smoke)") and "| ddp | 0 |" in md


def test_gpu_check_without_a_gpu_says_to_use_smoke(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--smoke" in r.stderr and "Traceback" not in r.stderr
