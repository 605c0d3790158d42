"""Where a model comes from, checked before anything loads: a folder here, or a hub id in the local cache.

transformers takes a path that does not exist for a hub id, and then fails with "Repo id must be in
the form 'repo_name'..." or, offline, with advice to check the internet connection; a folder without
a config ends in "unsupported model_type None". mmfast never downloads, so each case is one line
naming the path and what is wrong (and, for a hub id, how to get it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What makes a folder loadable: an mmfast encoder, a peft adapter, or a transformers model.
MODEL_MARKERS = ("mmfast_encoder.json", "adapter_config.json", "config.json")
# A hub id: "name" or "owner/name", letters, digits and - _ . (huggingface_hub's own rule, without its exception).
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def _cached_config(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def check_model_source(name: str | os.PathLike, what: str = "model") -> None:
    """Raises FileNotFoundError (or NotADirectoryError) in one line naming `name` and what is wrong,
    unless it is a model folder here or a hub id whose config is in the local HF cache.

    what: how the message names the argument (`--model_name_or_path`, `--model`, ...)."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {text}: a file, not a model folder")
        if not any((path / marker).is_file() for marker in MODEL_MARKERS):
            markers = f"{', '.join(MODEL_MARKERS[:-1])} or {MODEL_MARKERS[-1]}"
            raise FileNotFoundError(f"{what} {text}: a folder without {markers}, so not a model folder")
        return
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or not HUB_ID.match(text)
    if looks_like_path:
        raise FileNotFoundError(f"{what} {text}: no such folder")
    if not _cached_config(text):
        raise FileNotFoundError(
            f"{what} {text}: no such folder here, and not a hub model in the local cache (mmfast never downloads); "
            f"get it with `hf download {text}`, or give the path of a local copy"
        )


# A folder inside the local HF cache: <cache>/models--<owner>--<name>/snapshots/<revision>/.
HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/[^/]+/?$")


def portable_source(source: str, folder: str | os.PathLike) -> str:
    """How a folder saved in `folder` names the model it builds on, so that it still loads once copied
    elsewhere: a hub id stays a hub id (a snapshot folder of the HF cache becomes its hub id again); a
    local folder becomes a path relative to `folder` ("./…" or "../…"), so the two move together."""
    text = str(source)
    if not os.path.isdir(text):
        return text
    absolute = os.path.abspath(text)
    cached = HUB_CACHE_SNAPSHOT.search(absolute.replace(os.sep, "/"))
    if cached:
        return cached["repo"].replace("--", "/")
    relative = Path(os.path.relpath(absolute, os.path.abspath(folder))).as_posix()
    return relative if relative == "." or relative.startswith("..") else f"./{relative}"


def resolve_source(recorded: str, folder: str | os.PathLike) -> str:
    """The model a saved folder names (`portable_source`), as a path or hub id to load: a relative path
    is taken from `folder`; an absolute path or a hub id is kept."""
    if recorded.startswith(("./", "../")) or recorded in (".", ".."):
        return os.path.normpath(os.path.join(os.path.abspath(folder), recorded))
    return recorded
