"""Atomic writes: a result file, or a whole directory, is either the old one or the complete new
one, never half; and a failure to write (a full disk, no permission) is one line naming the path."""
from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MmtagError

# mkstemp creates files 0600; results should get the permissions a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK

# safetensors (Rust) reports I/O failures as its own exception type, "... (os error 28) ...".
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")

STAGING_SUFFIX = ".staging"  # `.NAME.XXXXXXXX.staging/` beside a directory being replaced


def write_error(path: str | Path, exc: BaseException) -> MmtagError | None:
    """The one-line error for an operating-system failure while writing `path` (ENOSPC, EACCES,
    EROFS, ...), or None when `exc` is something else (a bug should keep its traceback)."""
    if isinstance(exc, MmtagError):
        return None  # already says what went wrong
    code = exc.errno if isinstance(exc, OSError) else None
    if isinstance(exc, OSError) and exc.filename:
        path = exc.filename  # the file the OS named, e.g. one a library wrote inside a directory
    if code is None:
        match = _OS_ERROR_IN_TEXT.search(str(exc))
        code = int(match.group(1)) if match else None
    if code is None:
        return None
    return MmtagError(f"{path}: could not be written: {os.strerror(code)}")


@contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Inside the block, an OS failure to write (see `write_error`) becomes its one-line error;
    anything else (a bug) keeps its traceback."""
    try:
        yield
    except Exception as exc:
        error = write_error(path, exc)
        if error is None:
            raise
        raise error from None


def not_a_directory(path: str | Path) -> str | None:
    """Why no directory can be at `path` (a file there, or a file where a parent should be), or
    None when one can."""
    path = Path(path)
    block = blocking_file(path)
    if block is None:
        return None
    return "exists and is not a directory" if block == path else f"{block} is not a directory"


def blocking_file(path: str | Path) -> Path | None:
    """`path` itself or the nearest ancestor that exists but is not a directory, if any: what
    makes a directory impossible to create at `path`."""
    for p in (Path(path), *Path(path).parents):
        if p.is_dir():
            return None
        if p.exists() or p.is_symlink():
            return p
    return None


def make_dirs(path: str | Path) -> Path:
    """`mkdir -p path`, with a one-line error naming the file in the way or the OS's reason."""
    path = Path(path)
    why = not_a_directory(path)
    if why is not None:
        raise MmtagError(f"{path}: cannot be a directory: {why}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MmtagError(f"{path}: cannot create this directory: {exc.strerror}") from None
    return path


def check_writable_dir(directory: str | Path) -> None:
    """Refuse now, not after hours of work, a directory where nothing can be created (as root,
    `os.access` says yes to everything, so a real entry is made and removed)."""
    directory = make_dirs(directory)
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmtag-probe.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MmtagError(f"{directory}: cannot write here: {exc.strerror}") from None


def check_writable_file(path: str | Path) -> None:
    """Refuse now, before the work that produces it, an output file that cannot be written: a
    directory in its place, a file where its folder should be, or a folder that takes no files."""
    path = Path(path)
    if path.is_dir():
        raise MmtagError(f"{path}: is a directory; give a file name")
    check_writable_dir(path.parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`. OS failures
    (a full disk included) become a one-line MmtagError; the temp file never stays behind."""
    path = Path(path)
    tmp_path: Path | None = None
    try:
        with write_errors(path):
            make_dirs(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            os.chmod(tmp_path, _FILE_MODE)
            yield tmp_path
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Let `writer(tmp_path)` produce the file (e.g. safetensors' save_file), then publish it."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield a new, empty directory beside `target`; when the block completes, move it into
    `target`'s place. A directory already at `target` stays untouched until then: it is renamed
    aside, the new one renamed in, and only then deleted. On any failure or interrupt `target`
    is as it was and nothing new is left behind.

    The new directory is `.NAME.XXXXXXXX.staging/NAME`, so it has `target`'s name throughout
    (whatever is written into it, e.g. a report's title, names the run the user asked for).
    """
    target = Path(target)
    restore_staged(target)
    parent = make_dirs(target.parent)
    try:
        container = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=STAGING_SUFFIX, dir=parent))
    except OSError as exc:
        raise MmtagError(f"{parent}: cannot write here: {exc.strerror}") from None
    stage, previous = container / target.name, container / "previous"
    try:
        with write_errors(target):
            os.mkdir(stage, _DIR_MODE)
            yield stage
            if target.exists() or target.is_symlink():
                os.rename(target, previous)
            os.rename(stage, target)
            _fsync_dir(parent)
    finally:
        if _present(previous) and not _present(target):
            os.rename(previous, target)  # the swap was cut short: the old directory goes back
        shutil.rmtree(container, ignore_errors=True)


def restore_staged(target: str | Path) -> None:
    """Tidy what a process killed inside `staged_dir` left beside `target`: a directory it had
    set aside goes back to `target` if nothing took its place; the staging directory goes."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = f".{glob.escape(target.name)}.*{STAGING_SUFFIX}"
    for container in target.parent.glob(pattern):
        if not container.is_dir() or container.is_symlink():
            continue
        previous = container / "previous"
        if _present(previous) and not _present(target):
            os.rename(previous, target)
        shutil.rmtree(container, ignore_errors=True)


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); Windows cannot open directories, and needs no such step."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
