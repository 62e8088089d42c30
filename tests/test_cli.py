import subprocess
import sys

import pytest

from resnet_lab.cli import main


@pytest.mark.slow
def test_models_lists_exact_counts(capsys):
    assert main(["models", "--filter", "resnet"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["resnet20"][2] == "269,722"
    assert rows["resnet1202"][2] == "19,421,274"
    assert rows["resnet50"][2] == "25,557,032" and rows["resnet50"][3] == "4,089.2M"
    assert rows["resnet56"][7] == "A" and rows["resnet56"][5] == "27"


@pytest.mark.slow
def test_console_script_usage():
    r = subprocess.run([sys.executable, "-m", "resnet_lab.cli", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: resnet-lab" in r.stderr
