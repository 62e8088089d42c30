"""The LightningModule: a classifier built from an architecture spec.

It never receives a built nn.Module. Its init args are the spec's fields (None =
registry default), and the resolved spec is saved in its hyperparameters, so
`ResNetClassifier.load_from_checkpoint(path)` rebuilds the exact network.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric

from .errors import DivergenceError, UserError
from .models import ConvNeXtSpec, ResNetSpec, Spec, ViTSpec, build, resolve_spec, spec_from_dict
from .schedules import PaperLR

STAGES = ("train", "val", "test")
# The spec fields of every family that are model.* options (the registry name fixes the
# family, and in_chans is the data's). ResNetClassifier's signature lists them for the CLI;
# the test suite checks that the two agree, so a new spec field cannot be forgotten here.
# A field of another family than the name's is refused by name (SpecBase.replace).
SPEC_OPTIONS = tuple(
    dict.fromkeys(
        f.name
        for cls in (ResNetSpec, ViTSpec, ConvNeXtSpec)
        for f in dataclasses.fields(cls)
        if f.name not in ("family", "in_chans")
    )
)


class TopKHits(Metric):
    """Exact top-1 and top-k hit counts over an epoch, summed over DDP ranks.

    Accuracy and error come out in float64 from whole-image counts (2,179 wrong of 10,000
    is 21.79, not float32's 21.790000915527344); top-1 is the argmax, as in `ablate`."""

    full_state_update = False

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        for name in ("n", "hits1", "hitsk"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, y: Tensor) -> None:
        self.n += len(y)
        self.hits1 += (logits.argmax(1) == y).sum()
        self.hitsk += (logits.topk(self.k, dim=1).indices == y[:, None]).any(1).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.n.double()
        out = {}
        for suffix, hits in (("", self.hits1), ("5", self.hitsk)):
            out[f"acc{suffix}"] = hits.double() * 100 / n
            out[f"error{suffix}"] = (self.n - hits).double() * 100 / n
        return out


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint whose architecture differs from the configured one."""


class ResNetClassifier(pl.LightningModule):
    """Cross-entropy classifier; logs top-1/top-5 accuracy and error (%) per stage.

    Args:
        arch: a registry name (`resnet-lab models`); the fields below override it.
        depth, shortcut, plain, num_classes, stride_on, zero_init_residual, base_width,
        preact, block_type, stochastic_depth, survival_last, active_blocks:
            `ResNetSpec` fields; None keeps the registry default. num_classes is
            linked from the DataModule by the CLI.
        image_size, patch_size, width, heads, mlp_dim: `ViTSpec` fields (depth, plain
            and num_classes are shared).
        stage_depths, widths, stem, layer_scale, drop_path: `ConvNeXtSpec` fields.
        spec: a full spec dict, as stored in checkpoints; wins over all of the above.
        label_smoothing: of the training loss (Szegedy et al. 2016), in [0, 1); the
            val/test loss stays plain cross-entropy. `ablate`'s studies read it as the
            checkpoint's loss.
        channels_last: NHWC memory format (x1.15 on this CPU, faster on GPUs too).
        compile: torch.compile the network (x1.38 on CPU after a ~40 s cold compile).
        log_response_std: log the std of each 3x3 conv's response (after BN, before
            the addition/ReLU; He et al. Fig. 7) on the first validation batch.

    The optimiser and LR schedule come from the CLI's `optimizer:`/`lr_scheduler:`
    sections; `configure_optimizers` below is the paper's CIFAR recipe, used when
    the module is driven from Python without them.
    """

    def __init__(
        self,
        arch: str = "resnet20",
        depth: int | None = None,
        shortcut: str | None = None,
        plain: bool | None = None,
        num_classes: int | None = None,
        stride_on: str | None = None,
        zero_init_residual: bool | None = None,
        base_width: int | None = None,
        preact: bool | None = None,
        block_type: str | None = None,
        stochastic_depth: str | None = None,
        survival_last: float | None = None,
        active_blocks: int | None = None,
        image_size: int | None = None,
        patch_size: int | None = None,
        width: int | None = None,
        heads: int | None = None,
        mlp_dim: int | None = None,
        stage_depths: list[int] | None = None,
        widths: list[int] | None = None,
        stem: str | None = None,
        layer_scale: float | None = None,
        drop_path: float | None = None,
        spec: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
        compile: bool = False,
        log_response_std: bool = False,
    ) -> None:
        super().__init__()
        given = locals()
        if not (isinstance(label_smoothing, int | float) and 0 <= label_smoothing < 1):
            raise UserError(f"model.label_smoothing={label_smoothing!r} must be a number in [0, 1), e.g. 0.1")
        if spec is not None:
            self.spec = spec_from_dict(spec)
        else:
            self.spec = resolve_spec(arch, **{k: given[k] for k in SPEC_OPTIONS})
        self.save_hyperparameters()
        self.hparams["spec"] = self.spec.to_dict()  # what a checkpoint rebuilds from
        self.test_label = "test"  # "best_test" while the CLI tests the best-by-val checkpoint
        self.net = build(self.spec)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()  # in place: state-dict keys stay unprefixed
        top5 = min(5, self.spec.num_classes)
        self.metrics = torch.nn.ModuleDict(
            {
                f"{s}_": torch.nn.ModuleDict(
                    {"hits": TopKHits(top5), "loss": MeanMetric()}  # "train" is a reserved nn.Module attribute
                )
                for s in STAGES
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits; (B, crops, C, H, W) -> logits averaged over the crops."""
        crops = x.shape[1] if x.ndim == 5 else 0
        if crops:
            x = x.flatten(0, 1)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        return logits.view(-1, crops, logits.shape[-1]).mean(1) if crops else logits

    def _step(self, stage: str, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        # (images, labels), or with Mixup/CutMix (images, label of larger weight, soft targets):
        # the loss is taken against the soft targets, the error counts the label.
        x, y, *soft = batch
        logits = self(x)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, soft[0] if soft else y, label_smoothing=smoothing)
        metrics = self.metrics[f"{stage}_"]
        metrics["hits"].update(logits.detach(), y)
        if stage == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
            # The batch's training error, for the paper's training curves (Fig. 6): whole images, float64.
            error = (logits.detach().argmax(1) != y).sum().double() * 100 / len(y)
            self.log("train/error_step", error, on_step=True, on_epoch=False, batch_size=len(y))
        else:
            # A metric object, synced once per epoch: DDP ranks may hold different numbers of
            # eval batches (every image is evaluated exactly once), so no per-step collective.
            metrics["loss"].update(loss.detach(), weight=len(y))
        return loss, logits

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, logits = self._step("train", batch)
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"training diverged: the loss is {loss.item()} at step {self.global_step}; the last finite "
                "last.ckpt is kept. Lower optimizer.init_args.lr (or use lr_scheduler.init_args.warmup_lr)."
            )
        sched = self.lr_schedulers() if self.trainer is not None and self.trainer.lr_scheduler_configs else None
        if isinstance(sched, PaperLR) and sched.warming_up:
            # The paper's warm-up ends on the training error, not on a step count. Under DDP
            # the error is averaged over ranks, so every rank leaves the warm-up together.
            err = (logits.argmax(1) != batch[1]).float().mean() * 100
            sched.observe_train_error(float(self.trainer.strategy.reduce(err, reduce_op="mean")))
            self.log("train/warmup", 1.0)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step("val", batch)
        if self.hparams.log_response_std and batch_idx == 0:
            for name, std in self.net.response_stds(batch[0]).items():
                self.log(f"responses/{name}", std, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step("test", batch)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).softmax(-1)

    def _log_epoch(self, stage: str) -> None:
        metrics = self.metrics[f"{stage}_"]
        if not metrics["hits"].update_called and self.trainer.world_size == 1:
            return
        name = self.test_label if stage == "test" else stage
        for key, value in metrics["hits"].compute().items():  # synced across DDP ranks
            self.log(f"{name}/{key}", value, prog_bar=stage == "val" and key in ("acc", "error"))
        if stage != "train":  # train/loss is logged per step
            self.log(f"{name}/loss", metrics["loss"].compute(), prog_bar=True)
        for m in metrics.values():
            m.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        sched = PaperLR(opt, milestones=[32000, 48000])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_spec_matches(checkpoint.get("hyper_parameters", {}).get("spec"), self.spec, "the checkpoint")


def read_checkpoint(path: str | Path, weights_only: bool = False) -> Any:
    """torch.load of a checkpoint file, or one CheckpointMismatchError that names the file
    (never PyTorch's multi-line `weights_only` advice for a file that is no checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        with open(path, "rb") as f:
            head = f.read(2)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        why = first if head == b"PK" or head[:1] == b"\x80" else "not a PyTorch file"
        raise CheckpointMismatchError(
            f"{path} is not a readable PyTorch checkpoint ({why}); "
            "pass a checkpoints/*.ckpt written by `resnet-lab fit`"
        ) from e


def check_spec_matches(saved: dict[str, Any] | None, want: Spec, source: str, ignore: tuple = ()) -> None:
    """Raise CheckpointMismatchError unless `saved` (a checkpoint's spec dict) is `want`,
    naming each differing field; fields in `ignore` are not compared."""
    if saved is None:
        raise CheckpointMismatchError(f"{source} has no resnet-lab spec; it was not written by `resnet-lab fit`")
    have = spec_from_dict(saved)
    if type(have) is not type(want):
        raise CheckpointMismatchError(
            f"{source} holds a {have.name} (family {have.family}) but the config builds a {want.name} "
            f"(family {want.family}). Set model.arch to the checkpoint's, or drop --ckpt_path to start fresh."
        )
    diff = [
        f"{k}: checkpoint {getattr(have, k)!r} vs config {getattr(want, k)!r}"
        for k in have.to_dict()
        if k not in ignore and getattr(have, k) != getattr(want, k)
    ]
    if diff:
        raise CheckpointMismatchError(
            f"{source} holds a different architecture than the config ({'; '.join(diff)}). "
            "Set the model.* options to the checkpoint's values, or drop --ckpt_path to start fresh."
        )
