"""Read back what an offline W&B run recorded (tests and reports use this).

An offline run is one `run-<id>.wandb` file: the LevelDB log format (32 KiB blocks of
records, each with a 7-byte header: crc32, length, type) after a 7-byte ":W&B" header,
holding wandb's protobuf `Record`s. wandb 0.2x+ no longer ships a Python reader.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            return
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            buf = chunk
        elif kind == _MIDDLE:
            buf += chunk
        elif kind == _LAST:
            yield buf + chunk
            buf = b""
        elif kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0


def read_offline_run(run_dir: str | Path, timeout: float = 60.0) -> dict[str, Any]:
    """{"history": [row, ...], "config": {...}, "summary": {...}, "tags": [...], "group": str,
    "files": [...]} of the (single) offline run under `run_dir` (searched recursively).

    W&B's service process writes the file after `run.finish()` returns control to its
    caller; under load that takes a moment. The file is read again until it holds the run's
    exit record (it is then complete), for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb"))
        if len(files) > 1:
            raise ValueError(f"{len(files)} offline W&B runs under {run_dir}; expected one: {files}")
        out = _read(files[0]) if files else None
        if out is not None and out["exited"]:
            return out
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete offline W&B run under {run_dir} after {timeout} s (files: {files})")
        time.sleep(0.2)


def _read(path: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2

    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "tags": [], "group": "", "files": []}
    out["exited"] = False
    for payload in _payloads(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            out["config"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            out["summary"].update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update}
            )
        elif kind == "run":
            out["tags"], out["group"] = list(rec.run.tags), rec.run.run_group
            if rec.run.config.update:
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "files":
            out["files"] += [f.path for f in rec.files.files]
        elif kind == "exit":
            out["exited"] = True
    return out
