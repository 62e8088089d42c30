"""Read back what an offline W&B run recorded (tests and reports use this).

An offline run is one `run-<id>.wandb` file: the LevelDB log format (32 KiB blocks of
records, each with a 7-byte header: crc32, length, type) after a 7-byte ":W&B" header,
holding wandb's protobuf `Record`s. wandb 0.2x+ no longer ships a Python reader.
"""

from __future__ import annotations

import json
import struct
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


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """{"history": [row, ...], "config": {...}, "summary": {...}, "tags": [...], "group": str,
    "files": [...]} of the (single) offline run under `run_dir` (searched recursively)."""
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {run_dir}")
    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "tags": [], "group": "", "files": []}
    for payload in _payloads(files[-1]):
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
    return out
