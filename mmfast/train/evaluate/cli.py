"""`mmfast-eval`: evaluate an embedding model on the embedded held-out sets or on data of one's own.

    mmfast-eval                                   # runs/llave (else the untrained default) on every held-out set
    mmfast-eval --model DIR --task retrieval --data flickr30k.jsonl --image_root IMAGES --output OUT
    mmfast-eval --model DIR --dims 64 256 1024    # a Matryoshka model at each size, one row per size

It writes results.json, results.csv and score files into --output (default ./eval), and prints the
table. A user error prints one line naming it and exits with status 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ..command import progress_bars, run_command
from .report import TASKS, print_table, write_results

logger = logging.getLogger(__name__)

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

    from ..encoder import Encoder
    from ..model_source import check_model_source
    from . import evaluate_task
    from .default_sets import evaluate_default
    from .prefixes import check_dims, evaluate_prefixes, format_prefix_table, write_prefix_results

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
    parser.add_argument(
        "--dims", type=int, nargs="+", metavar="D",
        help="score each Matryoshka prefix (the first D dimensions, renormalised); embeds once for every size",
    )  # fmt: skip
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
        from ..default import default_backbone

        model = str(default_backbone())
        logger.warning("no --model and no %s yet: evaluating the UNTRAINED default backbone", DEFAULT_TRAINED)
    output = eval_output(args.output, model, next_to_model=args.output_next_to_model)
    # --no_progress: no bar of transformers (weight loading) or datasets (a held-out file converted to Arrow)
    with progress_bars(not args.no_progress):
        encoder = Encoder.from_pretrained(model, **overrides)
        cache = args.cache or os.path.join(output, "embedding_cache")
        where = f"writing results to {os.path.abspath(output)}, the embedding cache to {os.path.abspath(cache)}"
        print(f"mmfast-eval: {where}")
        common = {"batch_size": args.batch_size, "show_progress": not args.no_progress}
        if args.data is None:
            if args.image_root:
                raise ValueError("--image_root goes with --data")
            tasks = TASKS if args.task == "all" else (args.task,)

            def run(encoder, output, cache):
                return evaluate_default(encoder, tasks=tasks, output_dir=output, cache=cache, **common)
        else:
            if args.task == "all":
                raise ValueError(f"with --data, name its --task ({', '.join(TASKS)})")

            def run(encoder, output, cache):
                return evaluate_task(encoder, args.task, args.data, image_root=args.image_root, output_dir=output,
                                     strict=args.strict, cache=cache, **common)  # fmt: skip

        if args.dims:
            dims = check_dims(args.dims, encoder)
            # Every size reads one cache of full-size embeddings; each size's own is in memory only.
            by_dim = evaluate_prefixes(encoder, dims, lambda view, out: run(view, out, None), cache=cache,
                                       output_dir=output, **common)  # fmt: skip
            paths = write_prefix_results(by_dim, output)
            for dim, results in by_dim.items():
                print(f"--- the first {dim} dimensions ---")
                print_table(results)
            print(format_prefix_table(by_dim))
            print(f"results: {paths['json']} and {paths['csv']}")
            return {"dims": by_dim}
        results = run(encoder, output, cache)
    paths = write_results(results, output)
    print_table(results)
    print(f"results: {paths['json']} and {paths['csv']}")
    return results


def eval_main(argv: Sequence[str] | None = None) -> int:
    return run_command(evaluate, "mmfast-eval", argv)
