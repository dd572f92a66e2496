"""Atomic file output: every file we write appears whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .errors import AgeGenderError, OptionError
from .killpoints import kill_point


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    The temp file lives in the destination directory so the final ``os.replace`` is atomic.
    On any exception the temp file is removed and nothing is left at ``dest``; a failed write (disk full, a file
    size limit, a read-only or forbidden directory) becomes one line naming ``dest`` and the reason.
    """
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temp_files(parent)
        # The name is cut so the temp file's name stays legal wherever ``dest``'s is.
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name[:200]}.", suffix=_temp_suffix(), dir=parent)
    except OSError as e:
        raise AgeGenderError(os_reason(dest, e, "cannot write here")) from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        kill_point(f"replace:{dest.name}")
        try:
            os.replace(tmp_path, dest)
        except OSError as e:  # a name too long, a directory in the way: the output's problem whatever the errno
            raise AgeGenderError(os_reason(dest, e)) from None
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        reason = None if isinstance(e, AgeGenderError) else write_failure(e, parent)
        if reason is not None:
            raise AgeGenderError(f"{safe_name(dest)}: cannot write ({reason})") from None
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dest``; rename it to ``dest`` only if the block succeeds.

    Never replaces: ``dest`` must not exist when the block ends (an existing path is an error, the temp
    directory is removed). On any exception nothing is left at ``dest`` or beside it.
    """
    dest = Path(dest)
    with _temp_dir_beside(dest) as tmp:
        yield tmp
        if dest.exists() or dest.is_symlink():  # os.rename would replace an empty directory
            raise AgeGenderError(f"{dest}: already exists; not replaced")
        os.rename(tmp, dest)


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dest`` to write into; only if the block succeeds does its content
    appear in ``dest``: the directory renamed into place when ``dest`` is new, else its files moved in (replacing
    those of the same name, as writing them there would have). On any exception nothing is left of it.

    For outputs of many files (annotated copies), so that a write failing half-way (disk full) leaves none of them.
    """
    dest = Path(dest)
    with _temp_dir_beside(dest) as tmp:
        yield tmp
        if not (dest.exists() or dest.is_symlink()):
            try:
                os.rename(tmp, dest)
                return
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # else: created meanwhile, merge into it
                    raise AgeGenderError(os_reason(dest, e)) from None
        if not dest.is_dir():
            raise AgeGenderError(f"{safe_name(dest)}: exists and is not a directory")
        for root, _, names in os.walk(tmp):
            target = dest / os.path.relpath(root, tmp)
            try:
                target.mkdir(exist_ok=True)
                for name in names:
                    os.replace(os.path.join(root, name), target / name)
            except OSError as e:
                raise AgeGenderError(os_reason(target, e)) from None


@contextlib.contextmanager
def _temp_dir_beside(dest: Path) -> Iterator[Path]:
    """An empty temporary directory beside ``dest``, named as :func:`atomic_path` names its temp files, removed
    with whatever is left in it when the block ends."""
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temp_files(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name[:200]}.", suffix=_temp_suffix(), dir=parent))
    except OSError as e:
        raise AgeGenderError(os_reason(dest, e, "cannot write here")) from None
    umask = os.umask(0)  # mkdtemp makes 0700 directories; give it what a plain mkdir would have
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Temp files and folders are named ``.<dest name>.<random>.agegender-<pid>.part``: the pid says whose they are, so
# the next process that writes into the folder removes those whose writer is dead (killed, say, by SIGKILL, which
# runs no cleanup) and leaves a live writer's alone.
_TEMP_NAME = re.compile(r"^\..+\.agegender-(\d+)\.part$", re.S)
_swept: set[tuple[str, int, int]] = set()  # folders this process has already cleaned


def _temp_suffix() -> str:
    return f".agegender-{os.getpid()}.part"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_dead_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files and folders that processes now dead left in ``folder``; returns them.

    Done once per folder and process, on the first write there: one listing, however many files follow.
    """
    try:
        st = os.stat(folder)
    except OSError:
        return []
    key = (os.path.abspath(folder), st.st_dev, st.st_ino)
    if key in _swept:
        return []
    _swept.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        path = Path(folder) / entry.name
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


# errno values that only a write gives, so a failure inside an atomic_path block with one of them is the output's.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
# The same reasons as libraries that lose the errno (safetensors, torch.save) spell them.
_WRITE_TEXTS = {
    "no space left on device": "disk full",
    "os error 28": "disk full",
    "storagefull": "disk full",
    "disk quota exceeded": "disk quota exceeded",
    "file too large": "file too large",
    "read-only file system": "read-only file system",
}


def write_failure(e: BaseException, parent: Path) -> str | None:
    """Why a write into ``parent`` failed, when ``e`` says it or the filesystem shows it; None for other errors."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return _REASONS[e.errno]
    if not isinstance(e, Exception) or isinstance(e, AgeGenderError):
        return None
    text = str(e).lower()
    found = next((reason for key, reason in _WRITE_TEXTS.items() if key in text), None)
    if found or "write" not in text:
        return found
    # torch.save says only "file write failed": look at the disk and the process's file size limit.
    with contextlib.suppress(OSError):
        if os.statvfs(parent).f_bavail == 0:
            return "disk full"
    import resource

    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return "file too large for this process's file size limit"
    return None


def write_bytes_atomic(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8", "surrogateescape"))  # undecodable names keep their bytes


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def refuse_overwrite(folder: str | os.PathLike[str], markers: Sequence[str], force: bool = False, also: str = "") -> None:
    """Refuse to write into ``folder`` when it already holds one of ``markers`` (an earlier result), unless
    ``force``: a second run with other inputs must never silently replace the first one's output. ``also`` adds to
    the advice; a parameter in it is written in backticks, as :class:`~agegender.errors.OptionError` wants."""
    if force:
        return
    found = next((m for m in markers if (Path(folder) / m).exists()), None)
    if found is not None:
        raise OptionError(
            f"{Path(folder) / found}: already there from an earlier run; "
            f"pass `force` to replace it{also}, or choose another output folder",
            "force",
            *re.findall(r"`(\w+)`", also),
        )


def safe_name(text: object) -> str:
    """``text`` fit for a one-line message: control characters (newlines, terminal escapes) shown as escapes,
    and undecodable bytes (surrogates from os.fsdecode) as ``\\udcXX``, so printing it can neither split the
    line, drive the terminal, nor fail to encode."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


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


_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a parent is not a directory",
    errno.EISDIR: "is a directory",
}


def os_reason(path: str | os.PathLike[str], e: OSError, doing: str = "cannot write") -> str:
    """One line naming ``path`` and the OS reason, e.g. ``out.json: cannot write (disk full)``."""
    reason = _REASONS.get(e.errno or 0) or e.strerror or type(e).__name__
    return f"{safe_name(path)}: {doing} ({reason})"


def _file_id(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def check_outputs(
    inputs: Iterable[str | os.PathLike[str]],
    *,
    file: str | os.PathLike[str] | None = None,
    folder: str | os.PathLike[str] | None = None,
) -> None:
    """Refuse outputs that would destroy an input: ``file`` may not be any of ``inputs`` (by any name: symlinks
    and hard links are the same file), and the folder that gets one output per input may not hold an input.

    ``file`` must name a file: a directory, or a name ending in a slash, is refused rather than written as a file
    called like the folder.
    """
    inputs = list(inputs)
    if file is not None:
        text = os.fspath(file)
        if text.endswith(("/", os.sep)) or os.path.isdir(text):
            raise AgeGenderError(
                f"{safe_name(text)}: is a directory; give the output file's name, e.g. {safe_name(os.path.join(text, 'out'))}"
            )
        target = _file_id(text)
        same = next((i for i in inputs if target is not None and _file_id(i) == target), None)
        if same is not None:
            raise AgeGenderError(
                f"{safe_name(text)}: is the input file {safe_name(same)}; writing it would destroy "
                f"the input: choose another output"
            )
    if folder is not None:
        target = _file_id(folder)
        if target is None:
            return  # created now, so it holds no input
        if not os.path.isdir(folder):
            raise AgeGenderError(f"{safe_name(folder)}: exists and is not a directory")
        parents: dict[str, tuple[int, int] | None] = {}
        for i in inputs:
            parent = os.path.dirname(os.path.abspath(i))
            if parent not in parents:
                parents[parent] = _file_id(parent)
            if target in (parents[parent], _file_id(i) if os.path.isdir(i) else None):
                raise AgeGenderError(
                    f"{safe_name(folder)}: holds the input {safe_name(i)}, which its annotated copy "
                    f"would replace: choose another folder"
                )


LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "run directory") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing) while the block writes into it.

    A second process is refused at once with the holder's pid. The lock is ``flock`` on ``folder/.lock``, which
    the kernel releases when its holder dies however it dies, so a lock left by a killed process is simply taken
    over: the file only says who held it last.
    """
    import fcntl

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise AgeGenderError(os_reason(folder, e, "cannot write here")) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise AgeGenderError(
                f"{safe_name(folder)}: {what} in use by another process (pid {holder}); wait for "
                f"it to finish, or choose another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
