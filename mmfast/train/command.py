"""What mmfast's commands (`mmfast-train`, `mmfast-eval`, `mmfast-mine`, the examples) share: logging, the
libraries' progress bars, and the rule that a user error is one line and exit status 2, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from contextlib import contextmanager

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError)


def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr)
    logging.getLogger(__package__).setLevel(logging.INFO)  # mmfast.train


@contextmanager
def progress_bars(enabled: bool):
    """transformers' own bars (the weight-loading one) and datasets' ("Generating train split", as a data
    file is converted to Arrow) on or off for the block, as the user asked; each library's setting is
    restored after it, so a program that calls mmfast keeps its own."""
    import datasets
    from transformers.utils import logging as hf_logging

    turned_off = []
    if not enabled and hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        turned_off.append(hf_logging.enable_progress_bar)
    if not enabled and not datasets.are_progress_bars_disabled():
        datasets.disable_progress_bars()
        turned_off.append(datasets.enable_progress_bars)
    try:
        yield
    finally:
        for turn_on in turned_off:
            turn_on()


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
