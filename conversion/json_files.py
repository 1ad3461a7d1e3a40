"""Reading a source folder's JSON files (configs, weight indexes) with errors that say what is wrong."""

import json
from pathlib import Path

from .errors import ConversionError


def read_json_object(path: Path, missing_hint: str) -> dict:
    """The JSON object in `path`; a missing file (explained by `missing_hint`), bad JSON or a non-object is an error."""
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ConversionError(f"{path.parent} has no {path.name}: {missing_hint}") from error
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot read {path}: {error}") from error
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return loaded
