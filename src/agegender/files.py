"""Atomic file output: every file we write appears whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import AgeGenderError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    The temp file lives in the destination directory so the final ``os.replace`` is atomic.
    On any exception the temp file is removed and nothing is left at ``dest``.
    """
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=parent)
    except OSError as e:
        raise AgeGenderError(f"{dest}: cannot write here ({e.strerror or e})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_name(text: object) -> str:
    """``text`` fit for a one-line message: control characters (newlines, terminal escapes) shown as escapes,
    and undecodable bytes (surrogates from os.fsdecode) as ``\\udcXX``, so printing it can neither split the
    line, drive the terminal, nor fail to encode."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def regular_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` if it is a regular file (symlinks followed), else one line saying what it is instead.

    FIFOs and devices are refused before anything opens them: opening a FIFO blocks, and /dev/zero never ends.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise AgeGenderError(f"{safe_name(path)}: no such {what}") from None
        raise AgeGenderError(os_reason(path, e, "cannot read")) from None
    except ValueError:  # a NUL byte in the name
        raise AgeGenderError(f"{safe_name(path)}: not a valid file name") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
        raise AgeGenderError(f"{safe_name(path)}: not a regular file ({kind})")
    return path


_REASONS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENAMETOOLONG: "file name too long",
            errno.ENOENT: "no such file or directory", errno.ENOTDIR: "a parent is not a directory",
            errno.EISDIR: "is a directory"}


def os_reason(path: str | os.PathLike[str], e: OSError, doing: str = "cannot write") -> str:
    """One line naming ``path`` and the OS reason, e.g. ``out.json: cannot write (disk full)``."""
    reason = _REASONS.get(e.errno or 0) or e.strerror or type(e).__name__
    return f"{safe_name(path)}: {doing} ({reason})"
