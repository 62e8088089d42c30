"""Run lesion studies on checkpoints into an output directory, resumably.

Layout of `out/`:
    manifest.json   what was asked (checkpoints, data, studies, seeds); a different
                    manifest in the same directory is refused unless --overwrite, except
                    one that only adds checkpoints: their units are computed, the others kept
    results.jsonl   one line per finished evaluation unit, appended and fsynced as it
                    completes; a rerun skips units already there, so a kill loses at
                    most the unit in progress
    results.csv / results.json / *.png / report.md / report.html   (report.py)

A unit is (checkpoint, study, condition set), each study choosing its own (studies/):
e.g. the single-block sweep of one net, or one k of the k-lesion study.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import SEED_MAX, is_seed
from ..models import Network, Spec, build, spec_from_dict
from ..trainer_checks import run_seed
from . import pretrained
from .stats import arch_label
from .study import AblationError


@dataclass
class Loaded:
    """A checkpoint's network (eval mode) and what it was trained on."""

    path: str
    label: str
    model: Network
    spec: Spec
    data: dict[str, Any]  # {"class_path": ..., "init_args": {...}}
    train_metrics: dict[str, float]
    run_dir: str | None
    pretrained: bool = False  # torchvision weights: no run, no stored data location
    init: bool = False  # a freshly initialised network (init:ARCH), no checkpoint
    label_smoothing: float = 0.0  # of the training loss (ctx.loss)
    sample: tuple[str, ...] = ()  # what identifies its training run: "seed 0", "weights <digest>" (stats.samples)
    recipe: dict[str, Any] | None = None  # how it was trained, but for its seed (run_recipe; None: unknown)

    @property
    def arch(self) -> str:
        """What checkpoints must share to be pooled (an untrained net never pools with trained ones)."""
        return arch_label(self.spec.to_dict()) + (" (init)" if self.init else "")


def resolve_device(name: str) -> torch.device:
    """`--device`: cpu, cuda, cuda:N, or auto (CUDA when a device is visible, else the CPU). A
    device this machine does not have is an error that says what it has."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise AblationError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            raise AblationError(f"--device {name}: no CUDA device is visible here; use --device cpu (or auto)")
        if (device.index or 0) >= visible:
            raise AblationError(f"--device {name}: only {visible} CUDA device(s) here (cuda:0..cuda:{visible - 1})")
        device = torch.device("cuda", device.index or 0)
    return torch.device("cpu") if device.type == "cpu" else device


def device_label(device: torch.device) -> str:
    """How a report names the device: "cpu", or "cuda:0 (NVIDIA H200)"."""
    return "cpu" if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"


@contextlib.contextmanager
def full_float32(device: torch.device):
    """On CUDA, float32 convolutions and matmuls in full precision while the studies run: cuDNN
    may otherwise take convolutions in TF32 (PyTorch's default, ~1e-3 relative), which would
    move every loss, eigenvalue and gradient away from the CPU's values. Restored after."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    flags = [(torch.backends.cuda.matmul, "fp32_precision"), (conv, "fp32_precision")]
    if not all(hasattr(obj, attr) for obj, attr in flags):  # PyTorch before 2.9: the legacy switches
        flags = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]
    saved = [getattr(obj, attr) for obj, attr in flags]
    for obj, attr in flags:
        setattr(obj, attr, "ieee" if attr == "fp32_precision" else False)
    try:
        yield
    finally:
        for (obj, attr), value in zip(flags, saved):
            setattr(obj, attr, value)


INIT = "init:"
CIFAR = "resnet_lab.data.cifar.CIFAR10DataModule"


def is_init_ref(path: str | os.PathLike) -> bool:
    return str(path).startswith(INIT)


def load_init(ref: str, seed: int) -> Loaded:
    """`init:ARCH[@SEED]`: a registered architecture freshly initialised from SEED (default: the
    run's --seed: `torch.manual_seed(SEED)`, then the network's own initialisation; no training;
    `ablate` then estimates its BN statistics, settle_init_bn). Its data is CIFAR-10's
    default location (or --data-folder, or the trained checkpoints' beside it)."""
    from ..models import resolve_spec
    from ..models.spec import SpecError

    name, _, s = ref[len(INIT) :].partition("@")
    if s and not (s.isdigit() and is_seed(int(s))):
        raise AblationError(f"{ref}: the seed after @ must be an integer from 0 to {SEED_MAX}, e.g. init:{name}@1")
    seed = int(s) if s else seed
    try:
        spec = resolve_spec(name)
    except SpecError as e:
        raise AblationError(f"{ref}: {e} (see `resnet-lab models`)") from None
    torch.manual_seed(seed)
    model = build(spec).eval().to(memory_format=torch.channels_last)
    data = {"class_path": CIFAR if spec.input_size == 32 else pretrained.DATA, "init_args": {}}
    label = f"{spec.name} (init, seed {seed})"
    return Loaded(f"{INIT}{name}@{seed}", label, model, spec, data, {}, None, init=True, sample=(f"seed {seed}",))


INIT_BN_IMAGES = 1000


def settle_init_bn(ckpt: Loaded, dm, seed: int, n: int = INIT_BN_IMAGES) -> None:
    """Give an init: net the BN statistics its first training batches would normalise with: a
    fresh net's running statistics (mean 0, variance 1) would make eval-mode BN the identity,
    which no training step computes. Estimated on `n` training images drawn from `seed`
    (cumulative averages), every BN; the net stays in eval mode."""
    from .engine import recalibrate_bn

    if not ckpt.spec.BATCHNORM:  # a ViT, a ConvNeXt: no statistics to settle
        return
    device = next(ckpt.model.parameters()).device
    with torch.no_grad():
        recalibrate_bn(ckpt.model, batches(dm, "train", loader=dm.sample_dataloader("train", n, seed), device=device),
                       None)  # fmt: skip


def load_checkpoint(path: str | os.PathLike, seed: int = 0) -> Loaded:
    """A `resnet-lab fit` checkpoint, torchvision weights (`torchvision:NAME[=PATH]`, or a
    bare state-dict file; see pretrained.py), or `init:ARCH[@SEED]` (an untrained network)."""
    if is_init_ref(path):
        return load_init(str(path), seed)
    if pretrained.is_torchvision_ref(str(path)):
        return _pretrained(*pretrained.load_pretrained(str(path)))
    p = Path(path)
    if not p.is_file():
        raise AblationError(f"checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise AblationError(f"{p} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if pretrained.is_state_dict(ckpt):
        return _pretrained(*pretrained.from_state_dict(str(p), ckpt))
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "spec" not in hp or "state_dict" not in ckpt:
        raise AblationError(
            f"{p} is not a resnet-lab checkpoint (no spec in its hyperparameters); "
            "pass a checkpoints/*.ckpt written by `resnet-lab fit`"
        )
    spec = spec_from_dict(hp["spec"])
    model = build(spec)
    sd = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    model.load_state_dict(sd)
    model.eval().to(memory_format=torch.channels_last)  # as trained; x1.15 on CPU
    run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
    config = run_config(run_dir)
    data = _data_config(config, ckpt)
    metrics = {}
    for key, state in (ckpt.get("callbacks") or {}).items():
        if "best_model_score" in state and state.get("best_model_score") is not None and "val/error" in key:
            metrics["best val/error"] = float(state["best_model_score"])
    metrics["global_step"] = float(ckpt.get("global_step", 0))
    label = spec.name if run_dir is None else f"{spec.name} ({run_dir.name})"
    if p.stem != "last":
        label += f" [{p.stem}]"  # best-*.ckpt beside last.ckpt: a row set of its own
    smoothing = float(hp.get("label_smoothing") or 0.0)
    run = str(run_dir) if run_dir else None
    seed = run_seed(run)
    sample = (f"seed {seed}",) if seed is not None else (f"run {run_dir.resolve()}",) if run_dir else ()
    return Loaded(str(p), label, model, spec, data, metrics, run, label_smoothing=smoothing,
                  sample=(*sample, weights_digest(model)), recipe=run_recipe(config))  # fmt: skip


# What a run's config.yaml holds besides its training recipe: the seed (what pooled runs differ
# in), where it logged and saved, paths and devices, how it evaluated (a key and all under it).
NOT_RECIPE = (
    "seed_everything", "run", "sweep", "ckpt_path", "weights_only", "model.channels_last", "model.compile",
    "model.log_response_std", "data.init_args.root", "data.init_args.folder", "data.init_args.path",
    "data.init_args.download", "data.init_args.cache_dir", "data.init_args.on_device", "data.init_args.num_workers",
    "data.init_args.eval_batch_size", "data.init_args.eval_subset", "data.init_args.ten_crop",
    "data.init_args.eval_resize", "trainer.logger", "trainer.callbacks",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir", "trainer.profiler", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.enable_checkpointing", "trainer.enable_autolog_hparams", "trainer.model_registry",
    "trainer.num_sanity_val_steps", "trainer.check_val_every_n_epoch", "trainer.val_check_interval",
    "trainer.limit_val_batches", "trainer.limit_test_batches", "trainer.limit_predict_batches",
    "trainer.inference_mode", "trainer.detect_anomaly", "trainer.barebones", "trainer.plugins",
)  # fmt: skip


def run_config(run_dir: Path | None) -> dict[str, Any] | None:
    """The config.yaml a `fit` run saved (None where the run folder has none)."""
    path = (run_dir or Path()) / "config.yaml"
    if run_dir is None or not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


def run_recipe(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run's config (`run_config`) as {dotted key: value}, without NOT_RECIPE: what two runs
    that pool as seeds of one experiment must share (None for a run without a config)."""
    if config is None:
        return None
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if any(prefix == k or prefix.startswith(k + ".") for k in NOT_RECIPE):
            return
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            out[prefix] = v

    walk("", config)
    return out


def weights_digest(model: torch.nn.Module) -> str:
    """'weights <hex>': equal for bit-identical parameters and buffers (a copied checkpoint)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"weights {h.hexdigest()}"


def _pretrained(path: str, label: str, model: Network, data: dict[str, Any]) -> Loaded:
    return Loaded(path, label, model, model.spec, data, {}, None, pretrained=True, sample=(weights_digest(model),))


def load_checkpoints(paths: list[str], seed: int = 0) -> list[Loaded]:
    """Load every checkpoint, each with a label no other one shares (labels key the
    results: two checkpoints under one label would silently merge into one net)."""
    ckpts = [load_init(p, seed) if is_init_ref(p) else None for p in paths]  # init:X and init:X@seed alike
    resolved = [
        c.path if c else p if pretrained.is_torchvision_ref(p) else Path(p).resolve() for c, p in zip(ckpts, paths)
    ]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise AblationError(f"checkpoint(s) given more than once: {twice}; pass each file once")
    ckpts = [c or load_checkpoint(p) for c, p in zip(ckpts, paths)]
    for label in {c.label for c in ckpts}:
        same = [c for c in ckpts if c.label == label]
        if len(same) > 1:
            for c in same:
                c.label = f"{label} <{Path(c.path).parent.name}/{Path(c.path).name}>"
    for label in {c.label for c in ckpts}:
        same = [c for c in ckpts if c.label == label]
        if len(same) > 1:
            for i, c in enumerate(same, 1):
                c.label = f"{label} #{i}"
    return ckpts


def _data_config(config: dict[str, Any] | None, ckpt: dict) -> dict[str, Any]:
    """The run's data section (its config.yaml), else the checkpoint's DataModule hyperparameters."""
    if config is not None and isinstance(config.get("data"), dict) and "class_path" in config["data"]:
        return config["data"]
    hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    return {"class_path": "resnet_lab.data.cifar.CIFAR10DataModule", "init_args": hp}


def build_datamodule(data: dict[str, Any], folder: str | None = None, **overrides: Any):
    """The run's DataModule with `overrides` applied (None = keep); `folder` replaces
    its data location (CIFAR's `folder`, ImageNet's `path`). An override the class
    does not take is an error, never silently dropped."""
    mod, _, cls = data["class_path"].rpartition(".")
    dm_cls = getattr(importlib.import_module(mod), cls)
    init = dict(data.get("init_args") or {})
    loc = getattr(dm_cls, "location_arg", None)
    if folder is not None:
        if loc is None:
            raise AblationError(f"--data-folder is not supported for {cls}; it has no data-location argument")
        init[loc] = folder
    accepted = set(inspect.signature(dm_cls).parameters)
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in accepted)
    if unknown:
        raise AblationError(f"{cls} takes no {unknown}; this ablation cannot run on its data")
    init.update({k: v for k, v in overrides.items() if v is not None})
    where = init.get(loc) if loc else None
    if where and not Path(where).exists() and dm_cls.reads_location(init):
        raise AblationError(
            f"the data of this run, {where}, does not exist (moved, or stored relative to another directory); "
            "pass its new location with --data-folder PATH"
        )
    return dm_cls(**{k: v for k, v in init.items() if k in accepted})


def batches(
    dm, split: str, limit: int | None = None, loader=None, device: torch.device | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized, unaugmented (x, y) batches of a split (or of `loader`), at most `limit` images,
    on `device` (default: where the loader leaves them, the CPU)."""
    if loader is None:
        loader = {"val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    seen = 0
    for x, y in loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        x, y = dm.on_after_batch_transfer((x, y), 0)  # no trainer: normalization only
        if limit is not None:
            x, y = x[: limit - seen], y[: limit - seen]
        yield x, y
        seen += len(y)
        if limit is not None and seen >= limit:
            return


class Store:
    """Append-only, fsynced record of finished units, each with the device it was computed on
    (`device`, e.g. "cpu" or "cuda:0 (NVIDIA H200)"; lines of earlier versions: the CPU)."""

    def __init__(self, out: Path, manifest: dict[str, Any], overwrite: bool, device: str = "cpu") -> None:
        self.out, self.device = out, device
        self.path = out / "results.jsonl"
        mpath = out / "manifest.json"
        if mpath.exists():
            old = json.loads(mpath.read_text())
            added = added_checkpoints(old, manifest)
            if added:
                print(f"note: {out}: {added} checkpoint(s) added to the report; the finished units of the "
                      f"{len(old['checkpoints'])} already in it are kept", file=sys.stderr)  # fmt: skip
            elif old.get("hash") != manifest["hash"]:
                if not overwrite:
                    raise AblationError(
                        f"{out} holds a report of a different configuration; pass --overwrite to replace it, "
                        "or choose another --out (a report can only grow: the same options and data, with "
                        "its checkpoints first in their order and more after or between them)"
                    )
                shutil.rmtree(out)
        elif out.exists() and not out.is_dir():
            raise AblationError(f"--out {out} is a file; give a directory for the report")
        elif out.exists() and any(out.iterdir()) and not overwrite:
            raise AblationError(f"{out} is not empty and is not an ablation report; choose another --out")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AblationError(f"cannot create --out {out}: {e.strerror}; choose another directory") from e
        tmp = mpath.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, mpath)
        self.done: dict[str, list[dict]] = {}
        self.devices: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill: that unit reruns
                    continue
                self.done[rec["unit"]] = rec["rows"]
                self.devices[rec["unit"]] = rec.get("device", "cpu")  # before --device: always the CPU

    def add(self, unit: str, rows: list[dict]) -> None:
        torn = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(self.path, "a") as f:
            # A line torn by a kill must not swallow this record: start on a new line.
            f.write(("\n" if torn else "") + json.dumps({"unit": unit, "rows": rows, "device": self.device}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[unit] = rows
        self.devices[unit] = self.device

    def rows(self) -> list[dict]:
        return [r for rows in self.done.values() for r in rows]

    def device_counts(self) -> dict[str, int]:
        """{device: finished units computed on it}, in order of first use."""
        counts: dict[str, int] = {}
        for device in self.devices.values():
            counts[device] = counts.get(device, 0) + 1
        return counts


def manifest_for(ckpts: list[Loaded], opts: dict[str, Any]) -> dict[str, Any]:
    ids = []
    for c in ckpts:
        if c.init:
            ids.append({"init": c.path})
            continue
        st = Path(c.path).stat()
        ids.append({"path": str(Path(c.path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    body = {"checkpoints": ids, "data": ckpts[0].data, **opts}
    body["hash"] = hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
    body["labels"] = [c.label for c in ckpts]  # outside the hash, which reports of earlier versions keep
    return body


def added_checkpoints(old: dict[str, Any], new: dict[str, Any]) -> int:
    """How many checkpoints `new` adds to the report of `old` (0 if it is not such a growth):
    the same options and data, and every checkpoint of `old` still there, under its label (the
    key of its rows) and in its order (cka compares each checkpoint with those before it)."""

    def rest(m: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in m.items() if k not in ("hash", "checkpoints", "labels")},
                          sort_keys=True, default=str)  # fmt: skip

    def pairs(m: dict[str, Any]) -> list[tuple[str, str]]:
        return [(json.dumps(c, sort_keys=True), label) for c, label in zip(m["checkpoints"], m["labels"])]

    if "labels" not in old or rest(old) != rest(new):
        return 0
    remaining = iter(pairs(new))
    kept = all(pair in remaining for pair in pairs(old))  # a subsequence: each found after the one before
    return len(new["checkpoints"]) - len(old["checkpoints"]) if kept else 0


def check_blocks(model: Network, blocks: list[str] | None) -> list[str]:
    """The removable blocks: all, or the named ones (which must exist)."""
    if not blocks:
        return model.block_names
    unknown = [b for b in blocks if b not in model.block_names]
    if unknown:
        raise AblationError(
            f"unknown block name(s) {unknown} for {model.spec.name}; valid: {', '.join(model.block_names)} "
            f"({model.not_removable})"
        )
    return list(dict.fromkeys(blocks))


def check_compatible(ckpts: list[Loaded], num_classes: int | None = None) -> None:
    """Checkpoints compared in one report must share their data; with `num_classes`
    (the DataModule's), each head must also fit the data's labels."""
    for c in ckpts if num_classes is not None else []:
        if c.spec.num_classes != num_classes:
            tv = " torchvision's ImageNet weights index 1000 classes by sorted wnid: use the full val folder."
            tv *= c.pretrained
            raise AblationError(
                f"{c.label} has {c.spec.num_classes} outputs but the data has {num_classes} classes: its "
                f"labels would not match.{tv}"
            )
    a = ckpts[0]
    for b in ckpts[1:]:
        if b.spec.num_classes != a.spec.num_classes:
            raise AblationError(f"{a.path} has {a.spec.num_classes} classes but {b.path} has {b.spec.num_classes}")
        da, db = a.data.get("class_path"), b.data.get("class_path")
        key = ("folder", "source", "path", "root")
        ia = {k: (a.data.get("init_args") or {}).get(k) for k in key}
        ib = {k: (b.data.get("init_args") or {}).get(k) for k in key}
        unset = a.pretrained or b.pretrained or a.init or b.init  # no stored data: --data-folder decides
        if da != db or (ia != ib and not unset):
            raise AblationError(
                f"{a.path} and {b.path} were trained on different datasets ({da} {ia} vs {db} {ib}); "
                "compare checkpoints of the same data"
            )


def run_checkpoint(ckpt: Loaded, dm, store: Store, opts: Any, progress=None, peers: list[Loaded] = ()) -> None:
    """Every selected study's unfinished units of one checkpoint, in registry order."""
    from .context import Context
    from .studies import REGISTRY

    for study in REGISTRY.selected(opts.studies):
        study.run(Context(study, ckpt, dm, store, opts, progress, peers))
