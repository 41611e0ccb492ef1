"""Atomic writes: a result file, or a whole directory, is either the old one or the complete new
one, never half; and a failure to write (a full disk, no permission) is one line naming the path.

Bounded reads: every YAML and JSON file mmtag reads comes through `load_yaml` or `load_json`,
which refuse a file over a size bound before reading it, and YAML anchors and aliases (the
"billion laughs" config). CSV cells that carry user data go out through `csv_cell`."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .errors import QUOTE_LIMIT, MmtagError

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


# ------------------------------------------------------------------------------ bounded reads
MIB = 1 << 20
# config.yaml, presets, sweep grid files: a few KB in practice
CONFIG_MAX_BYTES = 1 * MIB
# a run's JSON (manifest, labels, thresholds, metrics, checkpoint and encoder metadata):
# labels.json with 10,000 labels of 100-character names is about 2 MB
RUN_FILE_MAX_BYTES = 64 * MIB
# validation.json: an id, a caption and an image path per validation row (out of fold: every
# training row), about 150 bytes a row, so 256 MiB holds well over a million rows
RECORD_MAX_BYTES = 256 * MIB


def read_bounded(path: str | Path, what: str, max_bytes: int) -> bytes:
    """The bytes of `path`, or a one-line MmtagError when it holds more than `max_bytes`: a
    regular file is measured before a byte is read, anything else (a pipe, /dev/zero) is read
    only up to the bound. OSError (not found, a directory, ...) is the caller's to word."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(max_bytes + 1) if size <= max_bytes else b""
    if size > max_bytes or len(data) > max_bytes:
        held = f"is {size:,} bytes" if size > max_bytes else "runs past it"
        raise MmtagError(f"{path}: a {what} may hold {_size(max_bytes)}; this one {held}")
    return data


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n:,} bytes"


def load_json(path: str | Path, what: str = "run file", max_bytes: int = RUN_FILE_MAX_BYTES) -> Any:
    """A JSON file read within `max_bytes` (`read_bounded`). OSError and ValueError (invalid
    JSON, bytes that are not UTF-8, nesting too deep to parse) are left to the caller, which
    knows what the file is for."""
    data = read_bounded(path, what, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None


class _AliasFound(yaml.YAMLError):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _PlainLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader without anchors and aliases. Aliases let a few lines stand for
    billions of items (nine levels of nine references); no mmtag config needs them, so the first
    anchor or alias is refused while composing, before any of it is expanded or built."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:  # `&name` on a node, or a `*name` alias
            raise _AliasFound(event.start_mark.line + 1)
        return super().compose_node(parent, index)


def load_yaml(path: str | Path, what: str, max_bytes: int = CONFIG_MAX_BYTES) -> Any:
    """A YAML file's data (SafeLoader, no anchors or aliases), read within `max_bytes`; every
    failure is a one-line MmtagError naming the file."""
    try:
        text = read_bounded(path, what, max_bytes).decode("utf-8")
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise MmtagError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise MmtagError(f"{path}: cannot read this {what}: {exc.strerror}") from None
    except _AliasFound as exc:
        raise MmtagError(f"{path}, line {exc.line}: YAML anchors and aliases (&name, *name) are "
                         f"not accepted in a {what}; write the values out") from None
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        why = f": {' '.join(problem.split())[:QUOTE_LIMIT]}" if problem else ""
        raise MmtagError(f"{path}: not valid YAML ({exc.__class__.__name__}{at}{why})") from None
    except UnicodeDecodeError:
        raise MmtagError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise MmtagError(f"{path}: not valid YAML (nested too deeply)") from None
    except ValueError as exc:  # a value YAML's constructors cannot build (an int of 5,000 digits)
        why = (str(exc).split(";")[0].splitlines() or [type(exc).__name__])[0][:QUOTE_LIMIT]
        raise MmtagError(f"{path}: not valid YAML ({why})") from None


# ------------------------------------------------------------------------------ CSV cells
# OWASP "CSV Injection": a spreadsheet program reads a cell that starts with one of these as a
# formula (=HYPERLINK(...), =cmd|...), so a user's label name or image id could run one.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """`text` as a CSV cell that a spreadsheet program shows as text: a leading "'" when it
    starts like a formula (OWASP's escape; the csv module quotes commas, quotes and line breaks
    per RFC 4180). Only CSV cells change: labels.json, the API and the server keep the name."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text
