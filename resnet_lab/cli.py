"""`resnet-lab` entry point.

    resnet-lab models                      # the model zoo
    resnet-lab fit|validate|test|predict   # LightningCLI (see resnet_lab/train.py)
    resnet-lab ablate CKPT [CKPT ...]      # lesion studies (see resnet_lab/ablation/)
    resnet-lab sweep --config EXP.yaml     # Optuna studies (see resnet_lab/sweep/)

Subcommands are dispatched before torch is imported: `fit`, `ablate` and `sweep` restart
themselves once (`_reexec_with_malloc_tunables`), and what this process had imported would
be thrown away.
"""

from __future__ import annotations

import os
import sys

from .errors import ArgumentParser, user_error

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def model_rows(filter_: str = "") -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """One row per registered name: its facts from the registry (`model_meta`); generic
    builders, which have none, are counted at their default depth. Built on the meta device."""
    import torch

    from .models import SpecError, count_macs, count_params, create_model, list_models, model_meta

    rows = []
    for name in list_models():
        if filter_ not in name:
            continue
        with torch.device("meta"):  # the shapes alone: no memory, no initialisation (the zoo: 12 s -> 3.4 s)
            m = create_model(name)
        s, meta = m.spec, model_meta(name)
        params, macs = (meta.params, meta.macs) if meta else (count_params(m), count_macs(m))
        paper = "-" if meta is None else meta.paper.label() if meta.paper else "none reported"
        rows.append(
            (
                name if meta else f"{name} (generic; depth {s.depth} shown)",
                s.family,
                f"{params:,}",
                f"{macs / 1e6:,.1f}M",
                f"{s.input_size}px",
                str(len(m.block_names)),
                s.block,
                "none (plain)" if s.plain else getattr(s, "shortcut", "identity"),
                str(s.num_classes),
                paper,
            )
        )
    if not rows:
        raise SpecError(f"no model name contains {filter_!r}; names: {', '.join(list_models())}")
    head = ("model", "family", "params", "MACs/img", "input", "blocks", "block", "shortcut", "classes", "paper error %")
    return head, rows


def models_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="resnet-lab models", description="List every registered model.")
    p.add_argument("--filter", default="", help="only names containing this substring")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    args = p.parse_args(argv)
    head, rows = model_rows(args.filter)
    if args.markdown:
        right = (2, 3, 5, 8)
        print("| " + " | ".join(head) + " |")
        print("| " + " | ".join("---:" if i in right else "---" for i in range(len(head))) + " |")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return 0
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        cells = [c.rjust(w) if i in (2, 3, 5, 8) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join([*cells, r[-1]]))
    return 0


# Large eval batches make glibc return freed memory with munmap and fault it back in
# on every batch; keeping it mapped was measured 2.5x faster on this kind of machine.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"


def _reexec_with_malloc_tunables() -> None:
    """glibc reads GLIBC_TUNABLES only at process start, so restart once with it set."""
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = GLIBC_TUNABLES
        try:
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        except OSError:
            pass  # keep going without the tunables


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("RESNET_LAB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    cmd = argv[0] if argv else ""
    if from_console:
        sys.argv = [sys.argv[0], *argv]  # without --debug: Lightning's DDP launcher re-runs sys.argv
    try:
        return _dispatch(cmd, argv, from_console)
    except Exception as e:
        user = user_error(e)
        if user is None or debug:
            raise
        print(f"resnet-lab {cmd}: error: {user}", file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
        return 2


def _dispatch(cmd: str, argv: list[str], from_console: bool) -> int:
    if cmd == "models":
        return models_main(argv[1:])
    if cmd in ("ablate", "sweep", *LIGHTNING_COMMANDS) and from_console:
        _reexec_with_malloc_tunables()
    if cmd == "ablate":
        from .ablation.cli import main as ablate_main

        return ablate_main(argv[1:])
    if cmd == "sweep":
        from .sweep.cli import main as sweep_main

        return sweep_main(argv[1:])
    if cmd in LIGHTNING_COMMANDS:
        from .train import cli_main

        cli_main(None if from_console else argv)
        return 0
    print(
        "usage: resnet-lab {models,fit,validate,test,predict,ablate,sweep} ... [--debug]\n"
        "  models     list the model zoo (params, MACs, blocks, shortcut)\n"
        "  ablate     test-time block removal / reordering studies and reports\n"
        "  sweep      Optuna study over the sweep: section of an experiment file\n"
        "  fit ...    train with LightningCLI: resnet-lab fit --config sweeps/depth.yaml\n"
        "Run `resnet-lab COMMAND --help` for a command's options; --debug shows tracebacks.",
        file=sys.stderr if cmd not in ("-h", "--help") else sys.stdout,
    )
    return 0 if cmd in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
