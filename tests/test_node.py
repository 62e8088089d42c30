"""An offline GPU node's software, without the node: a Python with only the node's packages
(RESNET_LAB_NODE_PYTHON; README, Offline GPU nodes) gets resnet-lab from the wheelhouse with
`pip install --no-index --no-deps --target`, and the GPU check's every step runs there on CPU.
Building the wheelhouse needs the package index; the test is skipped without the variable."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

NODE = os.environ.get("RESNET_LAB_NODE_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not NODE, reason="set RESNET_LAB_NODE_PYTHON to a Python with only the node's packages")
def test_the_wheelhouse_runs_the_gpu_check_on_the_node_s_versions(tmp_path):
    def ok(cmd, **kw):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    ok([sys.executable, str(REPO / "scripts" / "wheelhouse.py"), "--out", str(tmp_path / "wh")])
    wheels = sorted(str(p) for p in (tmp_path / "wh").glob("*.whl"))
    ok([NODE, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(tmp_path / "site"), *wheels])
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    node_torch = ok([NODE, "-c", "import torch; print(torch.__version__)"], env=env).stdout.strip()
    ok([NODE, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--out", str(tmp_path / "gc")], env=env)
    res = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert res["environment"]["torch"] == node_torch  # the node's own torch, never one from the wheelhouse
    assert res["main_job"]["rc"] == 0 and 0 <= res["main_job"]["test_error"] <= 100
    steps = ("bench_fit", "bench_lesion", "bench_paths", "bench_geometry_landscape", "bench_geometry_hessian",
             "ablate_cuda", "ddp")  # fmt: skip
    assert all(res[s]["rc"] == 0 for s in steps)
