"""scripts/wheelhouse.py: what an offline node gets. The download itself needs the index and
is run by hand (README, Offline GPU nodes); these tests check the choices it makes."""

import importlib.util
import zipfile

import pytest

from .conftest import REPO

spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def node_file(tmp_path, text):
    p = tmp_path / "node.txt"
    p.write_text(text)
    return p


def fake_wheel(folder, name, requires):
    path = folder / f"{name}-1.0-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", meta)
    return path


def test_node_list_reads_pip_freeze_and_bare_names(tmp_path):
    node = wheelhouse.read_node(node_file(tmp_path, "# comment\nTorch==2.11.0\ntyping_extensions\n\nPyYAML==6.0\n"))
    assert node == {"torch": "2.11.0", "typing-extensions": None, "pyyaml": "6.0"}


def test_the_shipped_node_list_has_the_gpu_image_s_torch():
    node = wheelhouse.read_node(wheelhouse.NODE)
    assert node["torch"] == "2.11.0" and node["torchvision"] == "0.26.0" and node["pytorch-lightning"] == "2.6.6"
    for absent in ("optuna", "wandb", "jsonargparse"):  # what the GPU machines lack (issue 27)
        assert absent not in node


def test_pins_of_the_node_s_packages_are_relaxed_to_its_versions(tmp_path):
    node = wheelhouse.read_node(node_file(tmp_path, "torch==2.11.0\nnumpy\nscipy==1.17.1\n"))
    kept, relaxed = wheelhouse.split_constraints(node)
    assert "torch==2.14.1 -> the node's torch==2.11.0" in relaxed
    assert "numpy==2.4.6 -> the node's own numpy" in relaxed
    assert not any(r.startswith("scipy") for r in relaxed)  # the node already has the pinned version
    assert not any(k.startswith(("torch==", "numpy==", "scipy==")) for k in kept)
    assert "jsonargparse==4.53.0" in kept and "optuna==5.0.0" in kept  # shipped at the tested versions


def test_wandb_is_left_out_unless_asked_for():
    assert "wandb" not in {r.name for r in wheelhouse.runtime_requirements(wandb=False)}
    assert "wandb" in {r.name for r in wheelhouse.runtime_requirements(wandb=True)}


def test_requirements_neither_shipped_nor_on_the_node_are_named(tmp_path):
    wheels = [
        fake_wheel(tmp_path, "a", ["b>=1", "c", "d; python_version < '3.12'", "e", "f; extra == 'docs'", "wandb"]),
        fake_wheel(tmp_path, "b", []),
    ]
    node = {"c": None}
    missing = wheelhouse.missing_requirements(wheels, node, "3.12", left_out={"wandb"})
    assert missing == ["a needs e"]  # d is for older Pythons, f an unrequested extra, wandb left out on purpose
    assert 'a needs d; python_version < "3.12"' in wheelhouse.missing_requirements(wheels, node, "3.11", set())


@pytest.mark.parametrize("args, words", [(["--python-version", "3"], "major.minor"),
                                         (["--node-packages", "/nonexistent.txt"], "no such file")])  # fmt: skip
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.setattr("sys.argv", ["wheelhouse.py", "--out", str(tmp_path / "wh"), *args])
    assert wheelhouse.main() == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "wh").exists()
