"""Reading a YAML or JSON file that must hold a mapping (a run config, a data spec), with errors
that name the file: a malformed file is a user error, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path


def read_mapping_file(path: str | Path, what: str, expected: str = "a mapping") -> dict:
    """The mapping in a `.yaml`/`.yml` (YAML) or any other (JSON) file; `what` names the file in
    errors and `expected` says what it must hold. An empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            mapping = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{what} {path} is not valid YAML: {error}") from error
    else:
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{what} {path} is not valid JSON: {error}") from error
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ValueError(f"{what} {path} must hold {expected}, not a {type(mapping).__name__}")
    return mapping
