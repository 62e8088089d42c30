"""Start-up of the `resnet-lab` commands against the imports every one of them needs.

    python scripts/bench_startup.py --rounds 5
    python scripts/bench_startup.py --rounds 5 --baseline-src /tmp/old   # also an older checkout

Each command runs to its `--help` (the parser built, nothing computed) in a fresh process,
as `python -m resnet_lab.cli`, which restarts itself once with the malloc setting as the
`resnet-lab` script does. The floor is one process importing torch, torchvision and
pytorch_lightning, which `fit` cannot do without. Rounds are interleaved; medians.
With --baseline-src DIR (a checkout of another commit, e.g. `git worktree add /tmp/old
HEAD~1`), each command also runs from DIR, side by side. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"fit": ["fit", "--help"], "ablate": ["ablate", "--help"], "sweep": ["sweep", "--help"]}
FLOOR = "import torch, torchvision, pytorch_lightning"


def seconds(cmd: list[str], src: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # as a user's shell: the CLI sets it
    env["PYTHONPATH"] = str(src)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, cwd="/", check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--baseline-src", type=Path, help="another checkout, timed beside this one")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.baseline_src and not (args.baseline_src / "resnet_lab" / "cli.py").is_file():
        p.error(f"--baseline-src {args.baseline_src} holds no resnet_lab/cli.py: pass a checkout of the repository")
    ways = {"floor": ([sys.executable, "-c", FLOOR], REPO)}
    for name, argv in COMMANDS.items():
        ways[name] = ([sys.executable, "-m", "resnet_lab.cli", *argv], REPO)
        if args.baseline_src:
            ways[f"{name} (baseline)"] = ([sys.executable, "-m", "resnet_lab.cli", *argv], args.baseline_src)
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(args.rounds):
        for name, (cmd, src) in ways.items():
            times[name].append(seconds(cmd, src))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"median_s": {k: round(v, 3) for k, v in med.items()},
           "over_floor": {k: round(v / med["floor"], 3) for k, v in med.items() if k != "floor"}}  # fmt: skip
    if args.baseline_src:
        out["over_baseline"] = {k: round(med[k] / med[f"{k} (baseline)"], 3) for k in COMMANDS}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
