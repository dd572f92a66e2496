"""Atomic file output: every file we write appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
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


def refuse_overwrite(folder: str | os.PathLike[str], markers: Sequence[str], force: bool = False,
                     also: str = "") -> None:
    """Refuse to write into ``folder`` when it already holds one of ``markers`` (an earlier result), unless
    ``force``: a second run with other inputs must never silently replace the first one's output."""
    if force:
        return
    found = next((m for m in markers if (Path(folder) / m).exists()), None)
    if found is not None:
        raise AgeGenderError(f"{Path(folder) / found}: already there from an earlier run; "
                             f"pass --force to replace it{also}, or choose another output folder")
