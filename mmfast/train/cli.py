"""`mmfast-train` (also `python -m mmfast.train`): train an embedding model with a recipe.

    mmfast-train                                   # the embedded default: tiny model, generated data
    mmfast-train --recipe llave --model_name_or_path DIR --data train.jsonl --image_dir DIR --output_dir OUT
    mmfast-train --config run.yaml --learning_rate 1e-5   # a YAML/JSON config plus overrides
    mmfast-train --config run.yaml --dry-run [--num_processes 8]   # check it and print the plan, no weights
    mmfast-train --config run.yaml --dry-run --accelerate_config examples/configs/accelerate-fsdp.yaml
    torchrun --nproc-per-node 2 -m mmfast.train ...       # data-parallel

A user error (a bad argument, a missing file, a malformed data file) prints one line naming it and
exits with status 2; it never ends in a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager

from .arguments import HELP_FLAGS, parse_arguments, print_help
from .default import PROFILE

logger = logging.getLogger(__name__)
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError)


def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr)
    logging.getLogger(__package__).setLevel(logging.INFO)


@contextmanager
def progress_bars(enabled: bool):
    """transformers' own bars (the weight-loading one) on or off for the block, as the user asked."""
    from transformers.utils import logging as hf_logging

    turned_off = not enabled and hf_logging.is_progress_bar_enabled()
    if turned_off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turned_off:
            hf_logging.enable_progress_bar()


def train(argv: Sequence[str] | None = None):
    """Parses, trains, saves the final model into output_dir; returns the trainer."""
    from .run import build_trainer, fit, leave_process_group

    arguments = parse_arguments(argv, profile=PROFILE)
    with progress_bars(not arguments[2].disable_tqdm):  # --disable_tqdm: no weight-loading bar either
        trainer = build_trainer(*arguments)
    trainer = fit(trainer)
    leave_process_group()
    return trainer


def run_command(command, program: str, argv: Sequence[str] | None) -> int:
    """Runs command(argv) and returns its exit status (its result when that is an int, else 0); a
    user error becomes one line naming it and exit status 2, never a traceback."""
    configure_logging()
    try:
        status = command(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


DRY_RUN_FLAGS = ("--dry-run", "--dry_run")


def train_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(flag in argv for flag in HELP_FLAGS):
        rest = [token for token in argv if token not in DRY_RUN_FLAGS]
        return run_command(lambda tokens: print_help(tokens, profile=PROFILE), "mmfast-train", rest)
    if any(flag in argv for flag in DRY_RUN_FLAGS):
        from .dry_run import dry_run_main

        configure_logging()
        rest = [token for token in argv if token not in DRY_RUN_FLAGS]
        return dry_run_main(rest, program="mmfast-train --dry-run", profile=PROFILE)
    return run_command(train, "mmfast-train", argv)


DEFAULT_TRAINED = os.path.join("runs", "llave")


def eval_output(output: str | None, model: str, *, next_to_model: bool) -> str:
    """Where `mmfast-eval` writes: --output, else <model>/eval when asked (never by default: the model
    may be a shared or cached folder), else ./eval."""
    if next_to_model:
        if output is not None:
            raise ValueError("--output and --output_next_to_model: give one of them")
        if not os.path.isdir(model):
            raise ValueError(f"--output_next_to_model: the model {model} is not a folder here")
        return os.path.join(model, "eval")
    return output or "eval"


def evaluate(argv: Sequence[str] | None = None) -> dict:
    """Parses `mmfast-eval` arguments, evaluates, writes results.json/.csv, prints the table."""
    import argparse

    from .encoder import Encoder
    from .evaluate import TASKS, evaluate_task, print_table, write_results
    from .evaluate.default_sets import DEFAULT_TASKS, evaluate_default
    from .model_source import check_model_source

    parser = argparse.ArgumentParser(prog="mmfast-eval", description="Evaluate an embedding model.")
    parser.add_argument("--model", help=f"an Encoder or HF model folder; default: {DEFAULT_TRAINED} if it exists")
    parser.add_argument("--task", choices=(*TASKS, "all"), default="all", help="default: every task")
    parser.add_argument(
        "--data", help="the task's data (see mmfast.train.evaluate); default: the embedded held-out sets"
    )
    parser.add_argument("--image_root", help="root of relative image (or video) paths")
    parser.add_argument(
        "--output", default=None, help="folder for results.json, results.csv and score files; default: ./eval"
    )
    parser.add_argument(
        "--output_next_to_model", action="store_true", help="write into <model>/eval instead (a folder --model only)"
    )
    parser.add_argument("--cache", default=None, help="embedding cache folder (default: <output>/embedding_cache)")
    parser.add_argument("--strict", action="store_true", help="a missing image is an error naming the file")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--text_prompt", help="the encoder's prompt for text inputs, with {text}")
    parser.add_argument("--image_prompt", help="the encoder's prompt for image inputs, with {text}")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars (embedding, weight loading)")
    parser.add_argument(
        "--cpu_threads", type=int, help="torch threads; default: 1 on the embedded sets (a tiny model), else torch's"
    )
    args = parser.parse_args(argv)
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise ValueError(f"--cpu_threads must be a positive integer, got {args.cpu_threads}")
    threads = args.cpu_threads or (1 if args.data is None else None)
    if threads:
        import torch

        # A second thread only spin-waits on a model this small (5x slower on a busy 2-core machine).
        torch.set_num_threads(threads)

    overrides = {k: getattr(args, k) for k in ("text_prompt", "image_prompt") if getattr(args, k)}
    if args.model:
        check_model_source(args.model, "--model")
        model = args.model
    elif os.path.isfile(os.path.join(DEFAULT_TRAINED, "mmfast_encoder.json")):
        model = DEFAULT_TRAINED
    else:
        from .default import default_backbone

        model = str(default_backbone())
        logger.warning("no --model and no %s yet: evaluating the UNTRAINED default backbone", DEFAULT_TRAINED)
    output = eval_output(args.output, model, next_to_model=args.output_next_to_model)
    with progress_bars(not args.no_progress):
        encoder = Encoder.from_pretrained(model, **overrides)
    cache = args.cache or os.path.join(output, "embedding_cache")
    print(f"mmfast-eval: writing results to {os.path.abspath(output)}, the embedding cache to {os.path.abspath(cache)}")
    common = {"cache": cache, "batch_size": args.batch_size, "show_progress": not args.no_progress}
    if args.data is None:
        if args.image_root:
            raise ValueError("--image_root goes with --data")
        tasks = DEFAULT_TASKS if args.task == "all" else (args.task,)
        results = evaluate_default(encoder, tasks=tasks, output_dir=output, **common)
    else:
        if args.task == "all":
            raise ValueError(f"with --data, name its --task ({', '.join(TASKS)})")
        results = evaluate_task(encoder, args.task, args.data, image_root=args.image_root, output_dir=output,
                                strict=args.strict, **common)  # fmt: skip
    paths = write_results(results, output)
    print_table(results)
    print(f"results: {paths['json']} and {paths['csv']}")
    return results


def eval_main(argv: Sequence[str] | None = None) -> int:
    return run_command(evaluate, "mmfast-eval", argv)
