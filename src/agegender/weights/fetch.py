"""Verified, resumable downloads of the published archives, and their safe extraction."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import shlex
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from ..errors import AgeGenderError, one_line
from ..files import os_reason, sha256_file, write_text_atomic
from .zoo import ZooFile

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds to connect and for each read, not for the whole download
_CHUNK = 1 << 16
_MARKER = ".agegender-extracted"  # written last, so its presence means the extraction is complete
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
LONG = 1000  # characters of a mirror's reason kept: URLs and two sha256 sums must fit


def default_cache_dir() -> Path:
    """``$AGEGENDER_HOME``, else ``$XDG_CACHE_HOME/agegender``, else ``~/.cache/agegender``."""
    if home := os.environ.get("AGEGENDER_HOME"):
        return Path(home).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "agegender"
    return Path.home() / ".cache" / "agegender"


def extraction_dir(archive: ZooFile, dest: str | os.PathLike[str]) -> Path:
    return Path(dest) / archive.filename.removesuffix(".tar.gz")


class _MirrorFailed(AgeGenderError):
    """One mirror did not give a good archive; the next mirror is tried."""


class _Unreachable(_MirrorFailed):
    """Nothing came from the mirror (no connection, DNS, an HTTP error)."""


class _Dropped(_MirrorFailed):
    """The transfer stopped part-way; the bytes so far are kept in the ``.part`` file for resuming."""


class _Rejected(_MirrorFailed):
    """What the mirror sent failed a check (size, sha256, not an archive, contents); it was deleted."""


def fetch(
    archive: ZooFile,
    dest: str | os.PathLike[str],
    *,
    url: str | None = None,
    extract: bool = True,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download, verify and (optionally) unpack ``archive`` into ``dest``; return the directory or the archive.

    The mirrors in ``archive.urls`` are tried in turn, after ``url`` when given (a URL ending in ``/`` gets the
    file name appended). An interrupted download resumes from ``<filename>.part`` on the next call. A file that
    fails a check (size, sha256, not a safe archive, the expected contents missing) is deleted and the next
    mirror tried. Without a published sha256, the archive's own is recorded (``<filename>.verified.sha256``)
    only once it has extracted (or, with ``extract=False``, been read through) and its contents checked out;
    later downloads must match it. Nothing is fetched if the file is already there and checks out.
    """
    dest = Path(dest)
    path = dest / archive.filename
    target = extraction_dir(archive, dest)
    _drop_legacy_record(path, target)
    if extract and (target / _MARKER).is_file():
        return target
    if extract and target.exists():  # checked before anything is downloaded
        raise AgeGenderError(f"{target}: exists but is not a complete extraction of {path.name}; move or delete it and rerun")
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AgeGenderError(f"{dest}: cannot create the download directory ({e.strerror or e})") from None
    failures: list[tuple[str, _MirrorFailed]] = []
    if path.is_file():
        try:
            return _accept(archive, path, _verify(archive, path, str(path)), extract)
        except _Rejected as e:
            log.warning("%s; downloading it again", e)
            failures.append(("the cached copy", e))
    for src in _mirrors(archive, url):
        log.info("fetching %s from %s (licence: %s)", archive.filename, src, archive.licence)
        try:
            digest = _download(archive, src, path, progress=progress, timeout=timeout)
            return _accept(archive, path, digest, extract)
        except _MirrorFailed as e:
            if len(_mirrors(archive, url)) > 1:
                log.warning("%s", e)
            failures.append((src, e))
    if created:  # a failed run leaves no empty cache directory behind (a kept .part keeps it)
        with contextlib.suppress(OSError):
            dest.rmdir()
    raise AgeGenderError(_advice(archive, path, failures))


def _mirrors(archive: ZooFile, url: str | None) -> list[str]:
    urls = [u + archive.filename if u.endswith("/") else u for u in ((url,) if url else ()) + archive.urls]
    return list(dict.fromkeys(urls))


def _advice(archive: ZooFile, path: Path, failures: list[tuple[str, _MirrorFailed]]) -> str:
    """One line: what each mirror did, then what the user can do next."""
    part = _part_path(path)
    if len(failures) == 1:
        what = one_line(failures[0][1], LONG)
    else:
        what = f"no mirror gave a good copy of {archive.filename} (" + "; ".join(one_line(e, LONG) for _, e in failures) + ")"
    steps = []
    if part.is_file():
        steps.append(f"the partial download is kept in {part}: rerun the same command to resume")
    if any(isinstance(e, _Rejected) for _, e in failures):
        steps.append("what failed its checks was deleted")
    if record := next((e.record for _, e in failures if isinstance(e, _Mismatch) and e.record), None):
        steps.append(f"if the publisher changed the file, delete {record} and rerun")
    if all(isinstance(e, _Unreachable) for _, e in failures):
        steps.append("check the network connection")
    steps.append(f"try another mirror with --url URL, or download {archive.filename} yourself to {path}")
    if archive.instead:
        steps.append(f"or skip the download: train and reproduce take {archive.instead}")
    return f"{what}; " + "; ".join(steps)


def locate(archive: ZooFile, dest: str | os.PathLike[str] | None = None) -> Path:
    """The unpacked directory of ``archive`` under ``dest`` (default: the cache), or an error saying how to get it."""
    root = Path(dest) if dest is not None else default_cache_dir()
    target = extraction_dir(archive, root)
    if (target / _MARKER).is_file():
        return target
    command = f"agegender fetch {archive.key}"
    if dest is not None and root.expanduser().resolve() != default_cache_dir().resolve():
        command += f" --dest {shlex.quote(str(dest))}"
    raise AgeGenderError(f"{archive.filename} is not unpacked in {root}: run `{command}` or pass --{archive.key} PATH")


def safe_extract(tar_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Unpack a tar archive into ``dest``, refusing any member that could land outside it or is a device."""
    tar_path, dest = Path(tar_path), Path(dest)
    root = os.path.realpath(dest)
    # tarfile's "data" filter re-checks every path against the real filesystem at write time.
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = _safe_members(tar, root, tar_path, AgeGenderError)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Python before 3.11.4; the checks above still ran
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise AgeGenderError(f"{tar_path}: cannot unpack ({e})") from None


def _safe_members(tar: tarfile.TarFile, root: str, path: Path, error: type[Exception]) -> list[tarfile.TarInfo]:
    """Every member of ``tar``, or ``error`` naming the first that could land outside ``root`` or is a device."""
    members = tar.getmembers()
    symlinks = {os.path.normpath(m.name) for m in members if m.issym()}
    for m in members:
        if problem := _unsafe_member(m, root, symlinks):
            raise error(f"{path}: refusing member {m.name!r}: {problem}")
    return members


def _unsafe_member(m: tarfile.TarInfo, root: str, symlinks: set[str]) -> str | None:
    parts = PurePosixPath(m.name).parts
    if m.name.startswith("/"):
        return "absolute path"
    if ".." in parts:
        return "'..' in the path"
    if m.ischr() or m.isblk() or m.isfifo():
        return "device or special file"
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        return "unsupported member type"
    if _through_symlink(parts[:-1], symlinks):
        return "path goes through a symlink in the archive"
    if m.issym() or m.islnk():
        if m.linkname.startswith("/"):
            return f"link to absolute path {m.linkname}"
        # Symlinks resolve from their own directory, hard links from the archive root.
        target = PurePosixPath(m.name).parent / m.linkname if m.issym() else PurePosixPath(m.linkname)
        resolved = os.path.normpath(os.path.join(root, target))
        if os.path.commonpath([resolved, root]) != root:
            return f"link points outside the destination ({m.linkname})"
        if _through_symlink(target.parts, symlinks):
            return f"link target {m.linkname} goes through another symlink"
    return None


def _through_symlink(parts: tuple[str, ...], symlinks: set[str]) -> bool:
    # Lexical checks cannot see where a symlink in the middle of a path really leads, so refuse those paths.
    return any(os.path.normpath(os.path.join(*parts[: i + 1])) in symlinks for i in range(len(parts)))


class _Mismatch(_Rejected):
    """A sha256 that differs from the published or the recorded one."""

    def __init__(self, message: str, record: Path | None) -> None:
        super().__init__(message)
        self.record = record  # the recorded sha256's file, None when the sha256 is the published one


def _part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _record_path(path: Path) -> Path:
    """Where the sha256 of an archive that extracted and checked out is kept (``sha256sum -c`` format)."""
    return path.with_name(path.name + ".verified.sha256")


def _drop_legacy_record(path: Path, target: Path) -> None:
    """Older versions recorded ``<file>.sha256`` at download time, before any check: garbage could be trusted.

    Such a record is kept (renamed to the verified one) only when a complete extraction carries the same sha256.
    """
    legacy = path.with_name(path.name + ".sha256")
    if not legacy.is_file():
        return
    words = legacy.read_text(encoding="utf-8", errors="replace").split()
    marker = target / _MARKER
    marked = marker.read_text(encoding="utf-8", errors="replace").split()[:1] if marker.is_file() else []
    if words and marked and words[0].lower() == marked[0].lower() and not _record_path(path).exists():
        os.replace(legacy, _record_path(path))
    else:
        log.info("%s: ignoring a sha256 recorded before the archive was checked", legacy)
        legacy.unlink()


def _expected_sha256(archive: ZooFile, path: Path) -> tuple[str | None, str, Path | None]:
    """The sha256 to check against, where it comes from, and the record file (None for a published one)."""
    if archive.sha256:
        return archive.sha256.lower(), "the published sha256", None
    record = _record_path(path)
    if not record.is_file():
        return None, "", None
    words = record.read_text(encoding="utf-8", errors="replace").split()
    if not words or not _SHA256.fullmatch(words[0].lower()):
        log.warning("%s: not a sha256 record; deleted", record)
        record.unlink()
        return None, "", None
    return words[0].lower(), f"the sha256 recorded in {record.name} when it first checked out", record


def _verify(archive: ZooFile, path: Path, what: str, digest: str | None = None) -> str:
    """The sha256 of ``path`` (``digest`` when already known) after its size and hash checks; on a failure the
    file is deleted (``_Rejected``)."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        path.unlink()
        raise _Rejected(f"{what}: {size:,} bytes, expected {archive.size:,}")
    digest = digest or sha256_file(path)
    expected, source, record = _expected_sha256(archive, path)
    if expected is not None and digest != expected:
        path.unlink()
        raise _Mismatch(f"{what}: sha256 {digest} does not match {source} ({expected})", record)
    return digest


def _download(archive: ZooFile, url: str, path: Path, *, progress: bool, timeout: float) -> str:
    part = _part_path(path)
    digest = _stream(url, part, archive.size, progress=progress, timeout=timeout)
    os.replace(part, path)
    return _verify(archive, path, url, digest)


def _accept(archive: ZooFile, path: Path, digest: str, extract: bool) -> Path:
    """Check the archive's contents (by extracting it, or reading it through), then record its sha256.

    An archive that is not readable, not safe or lacks ``archive.extracted`` is deleted (``_Rejected``).
    """
    try:
        if extract:
            out = _extract(archive, path, digest)
        elif _expected_sha256(archive, path)[0] == digest:  # a published sha256, or one recorded after a check
            out = path
        else:
            out = _check_members(archive, path)
    except _Rejected:
        path.unlink(missing_ok=True)
        raise
    if archive.sha256 is None and not _record_path(path).is_file():
        write_text_atomic(_record_path(path), f"{digest}  {path.name}\n")
    return out


def _check_members(archive: ZooFile, path: Path) -> Path:
    """Read ``path`` through without unpacking: every member safe, ``archive.extracted`` among them."""
    root = os.path.realpath(path.parent / ".check")
    try:
        with tarfile.open(path, "r:*") as tar:
            names = {os.path.normpath(m.name) for m in _safe_members(tar, root, path, _Rejected)}
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise _Rejected(f"{path}: not a readable tar archive ({one_line(e, LONG)})") from None
    wanted = os.path.normpath(archive.extracted)
    if wanted not in names and not any(n.startswith(wanted + "/") for n in names):
        raise _Rejected(f"{path}: has no {archive.extracted}; is this the right archive?")
    return path


def _stream(url: str, part: Path, size: int | None, *, progress: bool, timeout: float) -> str:
    """Bring ``part`` to the whole file, resuming from its current size; return its sha256."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            full = (e.headers.get("Content-Range") or "").rpartition("/")[2].strip()
            if full.isdigit() and int(full) == offset and size in (None, offset):
                # A previous run got every byte but stopped before the rename.
                return sha256_file(part)
            part.unlink()
            return _stream(url, part, size, progress=progress, timeout=timeout)
        raise _Unreachable(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise _Unreachable(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None

    with response:
        length = _int_header(response.headers.get("Content-Length"))
        if getattr(response, "status", None) == 206:  # file: URLs have no status and always send everything
            total = _check_content_range(url, part, response.headers.get("Content-Range", ""), offset, length)
        else:
            offset, total = 0, length
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise _Rejected(f"{url}: the server has {total:,} bytes but {part.name.removesuffix('.part')} should be {size:,}")
        expected = size if size is not None else total

        sha = hashlib.sha256()
        if offset:
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    sha.update(block)
        got, dropped = offset, False
        # read1 hands over what has arrived, so a timeout or reset loses nothing already received.
        read = getattr(response, "read1", response.read)
        try:
            with (
                open(part, "ab" if offset else "wb") as f,
                tqdm(
                    total=expected,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name.removesuffix(".part"),
                    disable=None if progress else True,
                ) as bar,
            ):
                while True:
                    try:
                        chunk = read(_CHUNK)
                    except (OSError, http.client.HTTPException):  # reset, timeout, truncated chunk
                        dropped = True
                        break
                    if not chunk:
                        break
                    f.write(chunk)
                    sha.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                    if expected is not None and got > expected:
                        break
        except OSError as e:  # disk full, a size limit: a partial file that cannot grow is no use to resume
            part.unlink(missing_ok=True)
            raise AgeGenderError(f"{os_reason(part, e)}; the partial download was removed") from None

    if expected is not None and got > expected:
        part.unlink()
        raise _Rejected(f"{url}: the server sent more than the expected {expected:,} bytes")
    if dropped or (expected is not None and got < expected):
        of = f" of {expected:,}" if expected is not None else ""
        raise _Dropped(f"{url}: connection dropped at byte {got:,}{of}")
    return sha.hexdigest()


def _check_content_range(url: str, part: Path, header: str, offset: int, length: int | None) -> int | None:
    """The full size from a 206 answer's Content-Range, after checking it continues our partial file."""
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None or int(match[1]) != offset or (length is not None and int(match[2]) + 1 - offset != length):
        part.unlink()
        raise _Rejected(
            f"{url}: asked for bytes {offset:,}- but the server answered Content-Range {header!r} (Content-Length {length})"
        )
    return None if match[3] == "*" else int(match[3])


def _int_header(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _extract(archive: ZooFile, path: Path, digest: str) -> Path:
    target = extraction_dir(archive, path.parent)
    if (target / _MARKER).is_file():
        return target
    if target.exists():
        raise AgeGenderError(f"{target}: exists but is not a complete extraction of {path.name}; move or delete it and rerun")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=path.parent))
    try:
        log.info("unpacking %s", path)
        try:
            safe_extract(path, tmp)
        except AgeGenderError as e:
            raise _Rejected(str(e)) from None
        if not (tmp / archive.extracted).exists():
            raise _Rejected(f"{path}: has no {archive.extracted}; is this the right archive?")
        (tmp / _MARKER).write_text(f"{digest}  {path.name}\n", encoding="utf-8")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
