"""Write an output folder completely or not at all.

The folder is built under a hidden name beside DST (same file system, so the final rename is
atomic) and renamed to DST only once complete. Any exception, Ctrl-C or SIGTERM removes it
again. Only a SIGKILL (or a power cut) can leave it behind, and then under a name that starts
with "." and contains ".partial-": never DST's own name.
"""

import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import ConversionError

PARTIAL_MARK = ".partial-"


def check_output_folder(src: str | os.PathLike | None, dst: str | os.PathLike, overwrite: bool) -> None:
    """Raise ConversionError unless `dst` may receive a conversion of `src` (None: output made from nothing on disk)."""
    dst = Path(dst).resolve()
    if src is not None:
        src = Path(src).resolve()
        if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
            raise ConversionError(f"the output folder {dst} overlaps the source {src}: choose a folder outside it")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"the output {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"the output folder {dst} is not empty: pass overwrite (--overwrite) to replace it")


@contextmanager
def staged_output(src: str | os.PathLike | None, dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside `dst`; when the block completes, it becomes `dst`.

    A non-empty `dst` is refused unless `overwrite`, in which case it is replaced only once the
    new folder is complete. Nothing is ever written inside `src` (None when the output has no source folder).
    """
    check_output_folder(src, dst, overwrite)
    dst = Path(dst).resolve()
    created_parents = [parent for parent in dst.parents if not parent.exists()]  # deepest first
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}{PARTIAL_MARK}{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        with _sigterm_raises_system_exit():
            yield staging
            _move_into_place(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created_parents:
            with suppress(OSError):  # only if still empty
                parent.rmdir()
        raise


def _move_into_place(staging: Path, dst: Path) -> None:
    if dst.is_dir() and any(dst.iterdir()):
        replaced = dst.parent / f".{dst.name}.replaced-{secrets.token_hex(4)}"
        os.rename(dst, replaced)
        os.rename(staging, dst)
        shutil.rmtree(replaced)
    else:
        os.replace(staging, dst)  # replaces an empty folder


@contextmanager
def _sigterm_raises_system_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so that the cleanup above runs (`kill` would otherwise skip it)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.getsignal(signal.SIGTERM)

    def exit_cleanly(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
