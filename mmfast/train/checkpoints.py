"""Checkpoints that are either complete or invisible, and the resume that finds the newest complete one.

The Trainer writes a checkpoint straight into `checkpoint-N/`, so a run killed while it saves leaves a
partial folder that looks like the newest checkpoint. Here every rank writes into
`<output_dir>/.partial/checkpoint-N/`; once all ranks are done, the process that saves writes the
folder's manifest (every file and its size) and renames the folder into place. A `checkpoint-N/`
folder is complete when its manifest lists files that are all there at their recorded sizes; a
folder written without a manifest (by another trainer) is judged by the files the Trainer writes.

`--resume_from_checkpoint True` (or `latest`) resumes from the newest complete checkpoint, saying
which incomplete folders it passed over and why; naming an incomplete checkpoint is an error that
says what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST_NAME = "mmfast_checkpoint.json"
STAGING_DIR = ".partial"  # not matched by the Trainer's `checkpoint-*` globs
LATEST = ("true", "latest")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# What the Trainer writes into every full checkpoint (a folder without a manifest is judged by these).
TRAINER_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
MODEL_FILES = ("mmfast_encoder.json",)


def staging_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / STAGING_DIR


def write_manifest(folder: Path) -> None:
    """Records every file of a finished checkpoint folder (all ranks' files) with its size."""
    files = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    written = folder / f"{MANIFEST_NAME}.tmp"
    with open(written, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(written, folder / MANIFEST_NAME)


def publish(staged: Path, final: Path) -> None:
    """Makes a finished staged checkpoint visible in one rename (replacing a folder of the same step)."""
    write_manifest(staged)
    if final.exists():
        replaced = staged.parent / f"replaced-{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        os.rename(staged, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(staged, final)


def missing_parts(folder: str | os.PathLike) -> list[str]:
    """What keeps a checkpoint folder from being complete; empty when it is complete."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return [f"{MANIFEST_NAME} (unreadable)"]
        problems = []
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                problems.append(name)
            elif path.stat().st_size != size:
                problems.append(f"{name} (cut short: {path.stat().st_size} of {size} bytes)")
        return problems
    problems = [name for name in (*TRAINER_FILES, *MODEL_FILES) if not (folder / name).is_file()]
    if not any(folder.glob("rng_state*.pth")):
        problems.append("rng_state.pth")
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            json.loads(state.read_text())
        except ValueError:
            problems.append("trainer_state.json (cut short)")
    return problems


def _step(folder: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(folder.name).group(1))


def checkpoint_folders(run_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of a run directory, by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=_step)


def _describe(folder: Path, problems: list[str]) -> str:
    return f"{folder} is incomplete (its save did not finish): missing {', '.join(problems)}"


def latest_complete_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint of a run directory, and why each newer folder was passed over."""
    passed_over = []
    staged = staging_dir(run_dir)
    if staged.is_dir():
        passed_over += [f"{folder}: a save that was interrupted" for folder in sorted(staged.iterdir())]
    for folder in reversed(checkpoint_folders(run_dir)):
        problems = missing_parts(folder)
        if not problems:
            return folder, passed_over
        passed_over.append(_describe(folder, problems))
    return None, passed_over


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """`--resume_from_checkpoint` as the Trainer takes it: None, or a complete checkpoint's path.

    True, "True" or "latest": the newest complete checkpoint in output_dir (an error when there is
    none); "False" or "": no resume; anything else names a checkpoint folder, which must be complete.
    """
    if value is None or value is False or str(value).strip().lower() in ("", "false", "none"):
        return None
    if value is True or str(value).strip().lower() in LATEST:
        found, passed_over = latest_complete_checkpoint(output_dir)
        for reason in passed_over:
            logger.warning("resume: passing over %s", reason)
        if found is None:
            seen = f" ({len(passed_over)} incomplete folder(s), listed above)" if passed_over else ""
            raise ValueError(
                f"--resume_from_checkpoint {value}: no complete checkpoint in --output_dir {output_dir}{seen}; "
                "leave the option out to start a new run"
            )
        logger.warning("resume: from %s, the newest complete checkpoint in %s", found, output_dir)
        return str(found)
    folder = Path(value)
    if not folder.exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such folder")
    if not folder.is_dir():
        raise NotADirectoryError(f"--resume_from_checkpoint {value}: not a folder")
    problems = missing_parts(folder)
    if problems:
        raise ValueError(f"--resume_from_checkpoint {value}: {_describe(folder, problems)}")
    return str(folder)


def rotate(run_dir: str | os.PathLike, limit: int | None, keep: str | None = None) -> None:
    """Deletes the oldest complete checkpoints beyond `limit`; never the newest complete one nor `keep`
    (the best model's). Incomplete folders are left for the user (a resume passes over them)."""
    if not limit or limit <= 0:
        return
    complete = [folder for folder in checkpoint_folders(run_dir) if not missing_parts(folder)]
    protected = {complete[-1]} if complete else set()
    if keep is not None:
        protected.add(Path(keep))
    excess = len(complete) - max(limit, len(protected))
    for folder in complete:
        if excess <= 0:
            break
        if folder not in protected:
            logger.info("deleting %s (save_total_limit %d)", folder, limit)
            shutil.rmtree(folder, ignore_errors=True)
            excess -= 1
