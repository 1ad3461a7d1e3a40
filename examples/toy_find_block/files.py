"""Writing result files so that a killed process never leaves one half-written."""

import json
import os
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)`, then move the finished file over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    replace_atomically(path, lambda p: p.write_text(json.dumps(data, indent=1) + "\n"))


def write_text(path: Path, text: str) -> None:
    replace_atomically(path, lambda p: p.write_text(text))
