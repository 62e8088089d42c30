"""`resnet-lab fit|validate ...` plus a callback that saves, on every rank, its parameters,
its callback metrics and the warm-up state to $DDP_PROBE_DIR/rank{R}.pt.

Run as a script (`python tests/ddp_probe.py fit ...`): Lightning's DDP launcher re-runs
this same command line in its child processes, so every rank gets the callback."""

import os
import sys
from pathlib import Path

import torch
from pytorch_lightning.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet_lab.train import cli_main  # noqa: E402


class Probe(Callback):
    def teardown(self, trainer, pl_module, stage: str) -> None:
        scheds = [c.scheduler for c in trainer.lr_scheduler_configs]
        torch.save(
            {
                "params": {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()},
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "warmup_ended_at": [getattr(s, "warmup_ended_at", None) for s in scheds],
            },
            Path(os.environ["DDP_PROBE_DIR"]) / f"rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    cli_main(sys.argv[1:], extra_callbacks=[Probe()])
