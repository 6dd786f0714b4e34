"""Optuna search over fine-tune hyperparameters on Ray Tune, recorded in MLflow; the same command continues the study.

    python sweeps/tune_finetune.py --source kmnist --arch resnet_mini --size 1000 --trials 50   [= xfer tune]
    python sweeps/tune_finetune.py --source glyph_letters --target mnist5k --size 500 --epochs 3 --trials 12
    python sweeps/tune_finetune.py --smoke      # embedded data, tiny sizes, CPU: a minute or two, mostly start-up

Searched: lr, weight decay, head-lr multiplier, freeze depth, unfreeze epoch, batch size, label smoothing
(TPE, seeded; the default configuration is the first trial); ASHA stops weak trials by validation error.
The study lives in Optuna's storage (default SQLite <runs>/optuna.db; --storage takes any SQLAlchemy URL):
--trials is the study's total, so a larger --trials adds trials. The pretrained model is the finished
pretrain cell of source × arch in MLflow (--pretrain-experiment), trained first when missing. Trials never
see the test split; the best and default models are evaluated on it once, at the end.
`python sweeps/full_grid.py --tuned` then uses the best configuration per (arch, size).
"""

from __future__ import annotations

import argparse
from typing import Any

from xfer.cli import add_cluster_flags, add_data_flags, add_run_flags, run_options
from xfer.errors import XferError
from xfer.specs import FinetuneSpec, PretrainSpec, TrainSpec

# Settings --smoke changes; anything given on the command line still wins.
DEFAULTS = dict(target="mnist", arch="resnet_mini", size=1000, val_size=TrainSpec.val_size, epochs=TrainSpec.epochs,
                trials=50, pretrain_size=0, pretrain_epochs=TrainSpec.epochs, batch_size=TrainSpec.batch_size)
# mlp_mixer at batch 32 (15 steps an epoch) is off chance after one epoch, so trials differ (ASHA and importances
# have something to compare); the sigmoid lenet5 stays at chance (0.9) for hundreds of steps, so every trial tied.
SMOKE = dict(source="glyph_letters", target="mnist5k", arch="mlp_mixer", size=500, val_size=200, epochs=2, trials=3,
             pretrain_size=500, pretrain_epochs=1, batch_size=32)


def parser() -> argparse.ArgumentParser:
    from xfer import tuning

    p = argparse.ArgumentParser(prog="sweeps/tune_finetune.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="pretraining dataset (required unless --smoke)")
    p.add_argument("--target", help=f"dataset fine-tuned on (default {DEFAULTS['target']})")
    p.add_argument("--arch", help=f"architecture (default {DEFAULTS['arch']})")
    p.add_argument("--size", type=int, help=f"fine-tune training examples; 0 = the whole pool (default {DEFAULTS['size']})")
    p.add_argument("--val-size", type=int, help=f"validation examples carved from the training pool (default {DEFAULTS['val_size']})")
    p.add_argument("--epochs", type=int, help=f"fine-tune epochs per trial = ASHA's max_t (default {DEFAULTS['epochs']})")
    p.add_argument("--trials", type=int, help=f"trials the study should have in total (default {DEFAULTS['trials']})")
    p.add_argument("--pretrain-size", type=int, help="pretraining examples, 0 = all (default 0; must match the grid's to reuse its model)")
    p.add_argument("--pretrain-epochs", type=int, help=f"pretraining epochs (default {DEFAULTS['pretrain_epochs']})")
    p.add_argument("--lr", type=float, default=TrainSpec.lr, help=f"the default configuration's lr (default {TrainSpec.lr:g}, the grid's)")
    p.add_argument("--batch-size", type=int, help=f"the default configuration's batch size (default {DEFAULTS['batch_size']})")
    p.add_argument("--optimizer", default=TrainSpec.optimizer, help=f"optimizer of every trial (default {TrainSpec.optimizer})")
    p.add_argument("--seed", type=int, default=0, help="data/model seed of every trial and the TPE sampler's seed")
    p.add_argument("--smoke", action="store_true", help="embedded data, tiny sizes, mlp_mixer: the real path on a CPU")
    p.add_argument("--experiment", default=tuning.DEFAULT_EXPERIMENT,
                   help=f"MLflow experiment of the study and its trials (default {tuning.DEFAULT_EXPERIMENT!r}, where --tuned looks)")
    p.add_argument("--pretrain-experiment", help="MLflow experiment holding the pretrain cell, e.g. the grid's "
                                                 "(default: --experiment); it is trained there when missing")
    p.add_argument("--storage", help="Optuna storage as a SQLAlchemy URL (default sqlite:///<runs>/optuna.db)")
    add_data_flags(p)
    add_cluster_flags(p)
    add_run_flags(p, force=False)
    return p


def study_from_args(args: argparse.Namespace) -> Any:
    """The study (a `tuning.StudySpec`) the flags describe, over the defaults (or the smoke study's)."""
    from xfer import tuning

    values = {**DEFAULTS, **(SMOKE if args.smoke else {})}
    values.update({k: v for k in (*DEFAULTS, "source") if (v := getattr(args, k)) is not None})
    if not values.get("source"):
        raise XferError("say which pretraining dataset to tune from: --source kmnist (or --smoke for the offline smoke study).")
    common = dict(arch=values["arch"], val_size=values["val_size"], batch_size=values["batch_size"],
                  optimizer=args.optimizer, seed=args.seed)
    pretrain = PretrainSpec(TrainSpec(dataset=values["source"], size=values["pretrain_size"] or None,
                                      epochs=values["pretrain_epochs"], **common))
    default = FinetuneSpec(TrainSpec(dataset=values["target"], size=values["size"] or None, epochs=values["epochs"],
                                     lr=args.lr, **common), pretrain)
    return tuning.StudySpec(default, sampler_seed=args.seed)


def trials_from_args(args: argparse.Namespace) -> int:
    trials = args.trials if args.trials is not None else (SMOKE if args.smoke else DEFAULTS)["trials"]
    if trials < 1:
        raise XferError(f"--trials {trials}: a study needs at least one trial.")
    return trials


def main(argv: list[str] | None = None) -> int:
    from xfer import progress, server, tracking, tuning

    args = parser().parse_args(argv)
    study, trials = study_from_args(args), trials_from_args(args)
    server.ensure_server()
    log = progress.log_path(f"tune-{study.name}")
    # The grid's quiet view: a line per trial event here (tuning.TrialLines); Ray's banners, Tune's messages and the
    # workers' output in the log; -v/--verbose puts them (and Tune's trial table) back on the terminal.
    options = run_options(args, args.experiment, force=False, log_file=None if args.verbose else str(log))
    with progress.quiet_logs(log, enabled=not args.verbose):
        outcome = tuning.run_study(study, trials, options, storage=args.storage,
                                   pretrain_experiment=args.pretrain_experiment)
    print(summary(outcome))
    print(f"MLflow UI: {tracking.ui_url(args.experiment)}  (parent run {outcome.parent_run_id})")
    if not args.verbose:
        print(f"log: {log}")
    return 0


def summary(outcome: Any) -> str:
    """A finished study (`tuning.StudyOutcome`) in a few lines."""

    def line(name: str, e: Any) -> str:
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.params.items())
        return f"  {name:<8} trial {e.number:>3}: val_error {e.val_error:.4f}  test_error {e.test_error:.4f}  {params}"

    lines = [f"\n== study {outcome.name}: {outcome.trials} trials ({outcome.ran} run now, "
             f"{outcome.stopped_early} of them stopped early by ASHA) in {outcome.storage}"]
    if outcome.default is not None:
        lines.append(line("default", outcome.default))
    lines.append(line("best", outcome.best))
    if outcome.importance:
        lines.append("  importance: " + ", ".join(f"{k} {v:.2f}" for k, v in outcome.importance.items()))
    lines += [f"  note: {n}" for n in outcome.notes]
    lines.append(f"  files: {outcome.out_dir}")
    if outcome.default is not None:
        lines.append(f"  default - best: validation error {outcome.default.val_error - outcome.best.val_error:+.4f}, "
                     f"test error {outcome.default.test_error - outcome.best.test_error:+.4f}")
    return "\n".join(lines)


__all__ = ["parser", "study_from_args", "trials_from_args", "main", "summary", "DEFAULTS", "SMOKE"]
