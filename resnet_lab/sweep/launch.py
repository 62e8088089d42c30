"""`resnet-lab sweep --workers N`: N workers of one study on this machine.

Each worker is the same `resnet-lab sweep` command without `--workers`, so it claims
cells from the shared storage exactly as a worker started by hand (or by Slurm) does.
Placement:
  - with GPUs, worker i sees only GPU i (`CUDA_VISIBLE_DEVICES`); `--workers gpus` starts
    one per visible GPU, and more workers than GPUs is an error;
  - on CPU, each worker runs cores // N torch threads.
The parent prefixes each worker's output with `[wI]`, forwards Ctrl-C and SIGTERM to the
workers (each gives its running cell back to the study, see run.give_back), and exits
non-zero naming every worker that failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO

from .space import SweepError

STOP_TIMEOUT = 120  # s a worker gets to give its cell back after SIGTERM, then SIGKILL


def parse_workers(text: str) -> int | str:
    """An argparse type: a count >= 1, or 'gpus'."""
    import argparse

    if text == "gpus":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers (or 'gpus')") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1 (or 'gpus': one worker per visible GPU)")
    return n


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    given = [x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return given[:n] if given else [str(i) for i in range(n)]


def placements(workers: int | str, threads: int | None) -> list[dict[str, str]]:
    """The extra environment of each worker (its GPU, or its torch threads on CPU:
    `threads` given by the user wins)."""
    gpus = visible_gpus()
    if workers == "gpus":
        if not gpus:
            raise SweepError("--workers gpus needs a visible GPU and none is; on CPU give a number: --workers 2")
        workers = len(gpus)
    assert isinstance(workers, int)
    if gpus:
        if workers > len(gpus):
            raise SweepError(
                f"--workers {workers} but only {len(gpus)} GPU(s) are visible ({','.join(gpus)}); one worker per "
                f"GPU: --workers {len(gpus)} (or --workers gpus)"
            )
        return [{"CUDA_VISIBLE_DEVICES": g} for g in gpus[:workers]]
    cores = os.cpu_count() or 1
    if workers > cores:
        raise SweepError(
            f"--workers {workers} on {cores} CPU core(s): workers beyond the cores slow each other down and none "
            f"finishes sooner; give --workers {cores} or fewer"
        )
    per = threads or max(1, cores // workers)
    if workers * per > cores:
        raise SweepError(
            f"--workers {workers} x --threads {per} = {workers * per} threads on {cores} CPU core(s): they would "
            f"slow each other down; give --threads {max(1, cores // workers)} or fewer workers"
        )
    return [{"OMP_NUM_THREADS": str(per)} for _ in range(workers)]


def worker_command(argv: list[str], env: dict[str, str]) -> list[str]:
    """One worker's command line: `resnet-lab sweep argv`, with its share of the cores as
    --threads on CPU unless argv gives --threads (`--threads N` or `--threads=N`)."""
    given = any(a == "--threads" or a.startswith("--threads=") for a in argv)
    threads = [] if given or "CUDA_VISIBLE_DEVICES" in env else ["--threads", env["OMP_NUM_THREADS"]]
    return [sys.executable, "-m", "resnet_lab.cli", "sweep", *argv, *threads, "--no-summary"]  # the launcher prints it


def _stream(i: int, pipe: IO[str], lock: threading.Lock) -> None:
    for line in pipe:
        with lock:
            sys.stdout.write(f"[w{i}] {line}")
            sys.stdout.flush()


def launch(argv: list[str], envs: list[dict[str, str]]) -> int:
    """Run `resnet-lab sweep argv` once per environment; 0 if every worker succeeded.
    On CPU each worker gets `--threads OMP_NUM_THREADS` unless argv sets --threads."""
    procs: list[subprocess.Popen] = []
    lock, readers = threading.Lock(), []
    for i, env in enumerate(envs):
        cmd = worker_command(argv, env)
        p = subprocess.Popen(
            cmd, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        procs.append(p)
        readers.append(threading.Thread(target=_stream, args=(i, p.stdout, lock), daemon=True))
        readers[-1].start()
        gpu = env.get("CUDA_VISIBLE_DEVICES")
        place = f"GPU {gpu}" if gpu else f"{env['OMP_NUM_THREADS']} torch thread(s)"
        print(f"[w{i}] pid {p.pid}, {place}", flush=True)
    stopped = threading.Event()

    def stop(signum, frame):  # each worker gives its running cell back, then exits
        stopped.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = None
        while any(p.poll() is None for p in procs):
            if stopped.is_set():
                deadline = deadline or time.monotonic() + STOP_TIMEOUT
                if time.monotonic() > deadline:  # a worker that does not stop: its cell goes stale, then retried
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for r in readers:
        r.join(timeout=5)
    return report(procs, stopped.is_set())


def report(procs: list[subprocess.Popen], stopped: bool) -> int:
    failed = [(i, p) for i, p in enumerate(procs) if p.returncode != 0]
    for i, p in failed:
        why = f"was killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exited {p.returncode}"
        print(f"resnet-lab sweep: worker w{i} (pid {p.pid}) {why}", file=sys.stderr)
    if stopped:
        print("resnet-lab sweep: stopped; run the same command again to resume the study", file=sys.stderr)
        return 130
    return 1 if failed else 0
