"""The command line, in one layer: `xfer grid|tune|adder|report|serve|stop|bench`, and the flags they share.

Each command is a module here (`grid`, `tune`, `adder`, `tools`) with a `parser()` and a `main(argv)`; the
scripts in sweeps/ are the same commands under the names README gives them. Flags that several commands take
(data, cluster, run) are built once below, and `run_options` turns them into the `RunOptions` the stages
take. A person-fixable problem (`XferError`) meets the terminal in `run_main`: one paragraph, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from xfer.errors import XferError

COMMANDS = {   # command → (its function, what it does); each function takes the command's own arguments
    "grid": ("xfer.cli.grid:main", "the main job: the whole grid (pretrain → fine-tune/scratch → adder → attack → report)"),
    "tune": ("xfer.cli.tune:main", "Optuna search over fine-tune hyperparameters on Ray Tune"),
    "adder": ("xfer.cli.adder:main", "the two-digit adder: transfer arms vs scratch"),
    "report": ("xfer.cli.tools:report", "build an experiment's report from MLflow"),
    "serve": ("xfer.cli.tools:serve", "(re)start the runs folder's MLflow server and print its URL"),
    "stop": ("xfer.cli.tools:stop", "stop the runs folder's MLflow server"),
    "bench": ("xfer.cli.tools:run_bench", "benchmarks: the training loop, packs, attacks, the GPU report"),
    "archs": ("xfer.cli.tools:archs", "an arch's parameter tensors, numbered as freeze depths"),
}


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`; a person-fixable problem is printed as one paragraph, without a traceback, exit 2."""
    try:
        code = main()
    except XferError as exc:
        # Lines break at spaces only: a name, path or flag with a hyphen (--data-root, study-1a2b) stays whole.
        print("\n" + textwrap.fill(f"xfer: {exc}", width=100, break_on_hyphens=False, break_long_words=False),
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nxfer: interrupted; finished cells are kept in MLflow, and running the same command again "
              "resumes where this run stopped.", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """`xfer COMMAND ...`: dispatch to the command's module."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<7} {what}" for name, (_, what) in COMMANDS.items()]
        usage = "usage: xfer COMMAND [options]   (xfer COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            raise XferError(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} (xfer --help).")
        print(usage)
        return 0
    module, function = COMMANDS[argv[0]][0].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])


def entry() -> None:
    """The `xfer` console script (pyproject's [project.scripts])."""
    run_main(main)


# ---- flags several commands share ------------------------------------------------------------------

def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="torchvision data root (default $XFER_DATA, else ./data)")
    p.add_argument("--download", action="store_true", help="download missing torchvision datasets (needs network)")


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    from xfer import packs

    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs (and torch threads) per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="fractional GPUs per trial (default $XFER_GPUS_PER_TRIAL, else 1/4 when the cluster has GPUs)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a crashed trial, each cell resuming from its last epoch (default 2)")
    p.add_argument("--storage-path", default=None, help="Ray storage for trial checkpoints (s3:// or NFS on a cluster)")
    p.add_argument("--pack-size", type=int, default=None,
                   help=f"cells trained per trial, in one process (1 = one cell per trial; default {packs.PACK_SIZE['cpu']} "
                        f"on a CPU, {packs.PACK_SIZE['cuda']} on a GPU, packs split so every trial slot has work)")


def add_run_flags(p: argparse.ArgumentParser, force: bool = True) -> None:
    if force:
        p.add_argument("--force", action="store_true", help="re-run cells that already finished")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Ray's and Tune's own output on the terminal too (by default it goes to a log in the runs folder)")


def run_options(args: argparse.Namespace, experiment: str, **extra: Any) -> Any:
    """The `RunOptions` of the shared flags in `args`, for the MLflow experiment `experiment`."""
    from xfer.stages import RunOptions

    values = dict(experiment=experiment, data_root=args.data_root, download=args.download, address=args.address,
                  cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures,
                  storage_path=args.storage_path, pack_size=args.pack_size, force=getattr(args, "force", False),
                  verbose=getattr(args, "verbose", False))
    return RunOptions(**{**values, **extra})


__all__ = ["run_main", "main", "entry", "add_data_flags", "add_cluster_flags", "add_run_flags", "run_options", "COMMANDS"]
