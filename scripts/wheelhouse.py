"""Build a wheelhouse for an offline (air-gapped) node, on a machine that reaches the index.

The folder holds binary wheels for resnet-lab's runtime dependencies that the node lacks,
resolved for the node's Python and platform, plus resnet-lab's own wheel. The node's own
packages (torch above all) are never shipped, so its CUDA build stays as it is. On the node:

    python3 -m pip install --no-index --no-deps --target ~/resnet-lab-site wheelhouse/*.whl
    export PYTHONPATH=~/resnet-lab-site

Build for this project's GPU machines (Python 3.12, manylinux x86-64, the package list in
scripts/nodes/h200-cuda-py312.txt); wandb is left out unless --wandb (use --run.logger csv):

    python3 scripts/wheelhouse.py --out wheelhouse
    python3 scripts/wheelhouse.py --out wheelhouse --wandb --node-packages node.txt --python-version 3.11

The node list is `pip list --format=freeze` of the node (names alone are accepted). Pins of
constraints.txt for packages the node has are relaxed to the node's versions, and printed.
Every shipped wheel's requirements are checked against the shipped set plus the node's list.
"""

from __future__ import annotations

import argparse
import email.parser
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
NODE = REPO / "scripts" / "nodes" / "h200-cuda-py312.txt"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
OPTIONAL = {"wandb"}  # shipped only when asked for: the main job runs with --run.logger csv


class WheelhouseError(Exception):
    """A problem the user can fix; printed as one line, exit 2."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_node(path: Path) -> dict[str, str | None]:
    """{canonical name: version or None} from `pip list --format=freeze` lines or bare names."""
    if not path.is_file():
        raise WheelhouseError(f"--node-packages {path}: no such file (write it on the node: pip list --format=freeze)")
    node: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        node[canonical(name.split("@")[0].strip())] = version.strip() or None
    if not node:
        raise WheelhouseError(f"--node-packages {path} lists no package")
    return node


def runtime_requirements(wandb: bool) -> list[Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return [r for r in reqs if wandb or canonical(r.name) not in OPTIONAL]


def split_constraints(node: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """constraints.txt -> (pins kept for the shipped packages, lines naming each relaxed pin)."""
    kept, relaxed = [], []
    for raw in (REPO / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        name = canonical(req.name)
        if name not in node:
            kept.append(line)
        elif node[name] is None:
            relaxed.append(f"{line} -> the node's own {req.name}")
        elif not req.specifier.contains(node[name], prereleases=True):
            relaxed.append(f"{line} -> the node's {req.name}=={node[name]}")
    return kept, relaxed


def pip(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise WheelhouseError(f"pip {args[0]} failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.stdout}")


def wheel_meta(path: Path) -> tuple[str, list[Requirement]]:
    """(canonical project name, its Requires-Dist) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(name).decode())
    return canonical(meta["Name"]), [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def missing_requirements(wheels: list[Path], node: dict, python_version: str, left_out: set[str]) -> list[str]:
    """Requirements (markers evaluated for the node) that neither the wheelhouse nor the node has,
    apart from those `left_out` on purpose."""
    env = {**default_environment(), "python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}  # fmt: skip
    metas = dict(wheel_meta(w) for w in wheels)
    have = set(metas) | set(node) | left_out
    missing = []
    for project, reqs in metas.items():
        for r in reqs:
            if (r.marker is None or r.marker.evaluate({**env, "extra": ""})) and canonical(r.name) not in have:
                missing.append(f"{project} needs {r}")
    return missing


def build(out: Path, node: dict, python_version: str, wandb: bool) -> tuple[list[Path], list[str]]:
    """Download and filter the wheels into `out`; returns (wheels, relaxed pins)."""
    needed = [r for r in runtime_requirements(wandb) if canonical(r.name) not in node]
    kept, relaxed = split_constraints(node)
    abi = "cp" + python_version.replace(".", "")
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi,
              "--abi", "abi3", "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)]]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cons = Path(tmp) / "constraints.txt"
        cons.write_text("\n".join(kept) + "\n")
        staging = Path(tmp) / "wheels"
        if needed:
            pip("download", "-q", "--disable-pip-version-check", *target, "-c", str(cons), "-d", str(staging),
                *map(str, needed))  # fmt: skip
        source = Path(tmp) / "resnet-lab"  # a copy: setuptools leaves build/ in the tree it builds
        shutil.copytree(REPO / "resnet_lab", source / "resnet_lab", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, source / name)
        pip("wheel", "-q", "--no-deps", "-w", str(staging), str(source))
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.whl"):
            old.unlink()
        for w in sorted(staging.glob("*.whl")):
            if wheel_meta(w)[0] not in node:  # the node's own copy stays in charge
                shutil.copy2(w, out / w.name)
    return sorted(out.glob("*.whl")), relaxed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="wheelhouse", help="the folder to write (its old wheels are replaced)")
    p.add_argument("--python-version", default="3.12", help="the node's Python, major.minor (default 3.12)")
    p.add_argument("--node-packages", type=Path, default=NODE, help=f"the node's packages (default {NODE.name})")
    p.add_argument("--wandb", action="store_true", help="also ship wandb (offline logging on the node)")
    args = p.parse_args()
    try:
        if not re.fullmatch(r"3\.\d+", args.python_version):
            raise WheelhouseError(f"--python-version {args.python_version}: give major.minor, e.g. 3.12")
        node = read_node(args.node_packages)
        out = Path(args.out).resolve()
        if out == REPO or out in REPO.parents:
            raise WheelhouseError(f"--out {args.out}: choose a folder of its own (e.g. wheelhouse)")
        wheels, relaxed = build(out, node, args.python_version, args.wandb)
        left_out = set() if args.wandb else OPTIONAL
        missing = missing_requirements(wheels, node, args.python_version, left_out)
    except WheelhouseError as e:
        print(f"wheelhouse: {e}", file=sys.stderr)
        return 2
    total = sum(w.stat().st_size for w in wheels)
    print(f"wheelhouse for CPython {args.python_version} manylinux x86-64 in {out}:")
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"  {total / 2**20:7.2f} MiB  in all, {len(wheels)} wheels")
    shown = [r for r in relaxed if "the node's own" not in r]
    print(f"pins of constraints.txt relaxed to the node's versions: {len(relaxed)}; where the version differs:")
    for line in shown:
        print(f"  {line}")
    if len(relaxed) > len(shown):
        print(f"  and {len(relaxed) - len(shown)} more to the node's own version (unlisted in --node-packages)")
    if left_out:
        print(f"left out on purpose: {', '.join(sorted(left_out))} (--wandb ships it; else use --run.logger csv)")
    if missing:
        print("requirements neither shipped nor on the node:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    print("on the node: python3 -m pip install --no-index --no-deps --target DIR wheelhouse/*.whl; "
          "export PYTHONPATH=DIR")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
