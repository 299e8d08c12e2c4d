"""Safe file I/O for every file haet writes, and for the files others made that it reads.

haet writes into folders other people may have prepared (shared bench folders, resumed runs) and
reads files it did not make (records, configs, checkpoints, data). The rules (README "Security
model"):

- a write never follows a symlink: outputs are written to a temporary created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` in the target's own directory, synced, then renamed over the
  target; a target (or a folder between the run's root and the target) that is a symlink, even a
  dangling one, is refused; a partial temporary is removed when the write fails;
- appends open with ``O_APPEND | O_NOFOLLOW``;
- reads take regular files only (no FIFO, device or directory), up to a size cap;
- an output folder is locked (``flock`` on ``DIR/.haet.lock``) for the life of a run;
- a string read from a file reaches Markdown or CSV only escaped: no newline survives, a CSV cell
  never starts with a formula character.

Every refusal is a `ConfigError` naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ConfigError

LOCK_NAME = ".haet.lock"
JSON_CAP = 64 * 2**20        # bytes: records and configs are kilobytes; this only stops /dev/zero-like files


# -- writes ------------------------------------------------------------------------------------
def check_writable_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Refuse `path` when it is a symlink (dangling or not) or not a regular file, or when a folder
    between `root` (default: `path`'s parent) and it is a symlink."""
    path = Path(path)
    if path.is_symlink():
        raise ConfigError(f"refused to write {path}: it is a symbolic link (haet never writes through links)")
    if path.exists() and not path.is_file():
        raise ConfigError(f"refused to write {path}: it exists and is not a regular file")
    root = Path(root) if root is not None else path.parent
    for parent in _parents_below(path, root):
        if parent.is_symlink():
            raise ConfigError(f"refused to write {path}: the folder {parent} is a symbolic link")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, root: str | os.PathLike | None = None,
                 mode: int = 0o644) -> Path:
    """Write `path` atomically: ``write(f)`` fills a fresh temporary beside it, which replaces it."""
    path = check_writable_path(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable_path(path, root)  # the folders now exist: check them again
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.is_symlink():  # appeared while writing: rename would replace the link, refuse anyway
            raise ConfigError(f"refused to write {path}: it is a symbolic link (haet never writes through links)")
        os.replace(tmp, path)
    except BaseException:
        with _quiet():
            os.unlink(tmp)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes, *, root: str | os.PathLike | None = None) -> Path:
    return atomic_write(path, lambda f: f.write(data), root=root)


def write_text(path: str | os.PathLike, text: str, *, root: str | os.PathLike | None = None) -> Path:
    return write_bytes(path, text.encode("utf-8"), root=root)


def append_text(path: str | os.PathLike, text: str, *, root: str | os.PathLike | None = None) -> Path:
    """Append `text` to `path` (created if missing) without following a symlink."""
    path = check_writable_path(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"refused to write {path}: it is a symbolic link") from None
        raise
    with os.fdopen(fd, "ab") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"refused to write {path}: not a regular file")
        f.write(text.encode("utf-8"))
    return path


# -- reads -------------------------------------------------------------------------------------
def open_regular(path: str | os.PathLike, *, follow: bool = False, what: str = "file"):
    """A binary file object for the regular file `path` (a symlink is refused unless `follow`)."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"no {what} at {path}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"refused to read {path}: it is a symbolic link") from None
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"refused to read {path}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike, cap: int, *, follow: bool = False, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, refused when larger than `cap`."""
    with open_regular(path, follow=follow, what=what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > cap:
            raise ConfigError(f"refused to read {path}: larger than the {cap // 2**20} MiB a {what} may be")
        data = f.read(size)
        if len(data) != size or f.read(1):
            raise ConfigError(f"refused to read {path}: it changed while being read")
    return data


def read_json(path: str | os.PathLike, *, what: str = "file", cap: int = JSON_CAP) -> Any:
    """JSON from `path` as data; any problem is a ConfigError naming the file."""
    data = read_bytes(path, cap, what=what)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{path} is not a valid {what} (JSON error: {str(err)[:200]})") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


# -- the output folder lock --------------------------------------------------------------------
class FolderLock:
    """An exclusive lock on an output folder for the life of a run (``with FolderLock(dir):``).

    A run in another process gets a ConfigError naming the holder's pid. Within one process the
    lock is re-entrant (a bench holds it while its report is written). The lock file is removed on
    release.
    """

    _held: dict[str, list] = {}  # folder -> [fd, depth] of the locks this process holds

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._key: str | None = None

    def acquire(self) -> "FolderLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.directory)
        if key in self._held:
            self._held[key][1] += 1
            self._key = key
            return self
        for _ in range(10):  # the holder may remove the file between our open and our lock: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise ConfigError(f"refused to lock {self.directory}: {LOCK_NAME} is a symbolic link") from None
                raise ConfigError(f"cannot lock output folder {self.directory}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(f"{self.directory} is in use by another haet run (pid {holder}); wait for it "
                                  "to finish or choose another --out") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._held[key] = [fd, 1]
                self._key = key
                return self
            os.close(fd)
        raise ConfigError(f"cannot lock output folder {self.directory}: the lock file keeps changing")

    def release(self) -> None:
        if self._key is None:
            return
        held, self._key = self._held[self._key], None
        held[1] -= 1
        if held[1] == 0:
            del self._held[os.path.realpath(self.directory)]
            with _quiet():
                os.unlink(self.path)
            os.close(held[0])  # closing releases the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- escaping for Markdown and CSV -------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*\[\]|])")  # no line starts with a cell: only inline markup matters


def plain(text: Any) -> str:
    """`text` as one line: every control, line or paragraph separator becomes a space."""
    return "".join(" " if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch for ch in str(text))


def md_cell(text: Any) -> str:
    """`text` safe inside a Markdown table cell or heading: one line, markup characters escaped."""
    return _MD_SPECIAL.sub(r"\\\1", plain(text)).replace("<", "&lt;").replace(">", "&gt;")


def csv_cell(value: Any) -> Any:
    """A CSV cell: numbers as they are; strings on one line, a leading ``= + - @`` neutralized
    with a quote (spreadsheets would run them as formulas)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return plain(text)


# -- helpers -----------------------------------------------------------------------------------
def _parents_below(path: Path, root: Path) -> Iterator[Path]:
    """The folders from `path`'s parent up to (and without) `root`, when `path` is under `root`."""
    try:
        rel = path.parent.relative_to(root)
    except ValueError:
        return
    current = root
    for part in rel.parts:
        current = current / part
        yield current


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)
