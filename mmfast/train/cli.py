"""`mmfast-train` (also `python -m mmfast.train`): train an embedding model with a recipe.

    mmfast-train                                   # the embedded default: tiny model, generated data
    mmfast-train --recipe llave --model_name_or_path DIR --data train.jsonl --image_dir DIR --output_dir OUT
    mmfast-train --config run.yaml --learning_rate 1e-5   # a YAML/JSON config plus overrides
    torchrun --nproc-per-node 2 -m mmfast.train ...       # data-parallel

A user error (a bad argument, a missing file, a malformed data file) prints one line naming it and
exits with status 2; it never ends in a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from .arguments import parse_arguments
from .default import PROFILE

logger = logging.getLogger("mmfast.train")
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError)


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr)
    logging.getLogger("mmfast.train").setLevel(logging.INFO)


def train(argv: Sequence[str] | None = None):
    """Parses, trains, saves the final model into output_dir; returns the trainer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .run import build_trainer

    model_args, data_args, training_args, recipe = parse_arguments(argv, profile=PROFILE)
    trainer = build_trainer(model_args, data_args, training_args, recipe)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        logger.info("saved the trained encoder to %s", training_args.output_dir)
        logger.info("%s", trainer.data_report.summary())
    return trainer


def train_main(argv: Sequence[str] | None = None) -> int:
    _configure_logging()
    try:
        train(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as error:
        print(f"mmfast-train: error: {error}", file=sys.stderr)
        return 2
    return 0
