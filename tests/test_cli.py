import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_lab.cli import GLIBC_TUNABLES, main
from resnet_lab.models import model_meta


@pytest.mark.slow
def test_models_prints_the_registry_facts(capsys):
    assert main(["models", "--filter", "resnet"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    for name in ("resnet20", "resnet1202", "resnet50", "preact_resnet164"):
        meta = model_meta(name)
        assert rows[name][2] == f"{meta.params:,}" and rows[name][3] == f"{meta.macs / 1e6:,.1f}M"
    assert rows["resnet56"][7] == "A" and rows["resnet56"][5] == "27"
    assert " ".join(rows["resnet56"][9:]).startswith("6.97 (He et al. 2015, Table 6")


def test_readme_model_table_is_the_registry(capsys):
    """The README's zoo table is `resnet-lab models --markdown`, so its counts and paper
    errors cannot drift from the registry."""
    assert main(["models", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert table in readme, "README's model table differs: paste `resnet-lab models --markdown` into it"


@pytest.mark.slow
def test_console_script_usage():
    r = subprocess.run([sys.executable, "-m", "resnet_lab.cli", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: resnet-lab" in r.stderr


def test_the_entry_point_restarts_before_it_imports_torch(tmp_path):
    """`resnet-lab fit|ablate|sweep` restarts itself once with GLIBC_TUNABLES set (cli.py); what
    the first process imported before that is thrown away. The entry point imports no torch,
    so every command (each sweep worker, each test's subprocess) pays torch's import once."""
    probe = "import sys, resnet_lab.cli; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    # The restart itself: the same command once more, with the setting (a stand-in executable records it).
    log = tmp_path / "argv"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$GLIBC_TUNABLES $@" > {log}\n')
    stub.chmod(0o755)
    code = f"import sys; sys.executable = {str(stub)!r}; from resnet_lab.cli import main; main()"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-c", code, "ablate", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert log.read_text().strip() == f"{GLIBC_TUNABLES} -c {code} ablate --help"
