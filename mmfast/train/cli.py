"""`mmfast-train` (also `python -m mmfast.train`): train an embedding model with a recipe.

    mmfast-train                                   # the embedded default: tiny model, generated data,
                                                   # held-out R@1 every 50 steps (default.EVALUATION)
    mmfast-train --recipe llave --model_name_or_path DIR --data train.jsonl --image_dir DIR --output_dir OUT
    mmfast-train --config run.yaml --learning_rate 1e-5   # a YAML/JSON config plus overrides
    mmfast-train --config run.yaml --dry-run [--num_processes 8]   # check it and print the plan, no weights
    mmfast-train --config run.yaml --dry-run --accelerate_config examples/configs/accelerate-fsdp.yaml
    torchrun --nproc-per-node 2 -m mmfast.train ...       # data-parallel

A user error (a bad argument, a missing file, a malformed data file) prints one line naming it and
exits with status 2; it never ends in a traceback. `mmfast-eval` is `mmfast.train.evaluate.cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .arguments import HELP_FLAGS, parse_arguments, print_help, with_default_evaluation
from .command import configure_logging, progress_bars, run_command
from .default import PROFILE


def train(argv: Sequence[str] | None = None):
    """Parses, trains, saves the final model into output_dir; returns the trainer."""
    from .run import build_trainer, fit, leave_process_group

    run = parse_arguments(argv, profile=PROFILE)
    # --disable_tqdm: no bar of transformers (weight loading) or datasets (a data file converted to Arrow) either
    with progress_bars(not run.training.disable_tqdm):
        trainer = fit(build_trainer(run))
    leave_process_group()
    return trainer


DRY_RUN_FLAGS = ("--dry-run", "--dry_run")


def train_main(argv: Sequence[str] | None = None) -> int:
    argv = with_default_evaluation(sys.argv[1:] if argv is None else argv)
    if any(flag in argv for flag in HELP_FLAGS):
        rest = [token for token in argv if token not in DRY_RUN_FLAGS]
        return run_command(lambda tokens: print_help(tokens, profile=PROFILE), "mmfast-train", rest)
    if any(flag in argv for flag in DRY_RUN_FLAGS):
        from .dry_run import dry_run_main

        configure_logging()
        rest = [token for token in argv if token not in DRY_RUN_FLAGS]
        return dry_run_main(rest, program="mmfast-train --dry-run", profile=PROFILE)
    return run_command(train, "mmfast-train", argv)
