"""Verified, resumable downloads of the published archives, and their safe extraction."""

from __future__ import annotations

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

from ..errors import AgeGenderError
from ..files import sha256_file, write_text_atomic
from .archives import Archive

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds to connect and for each read, not for the whole download
_CHUNK = 1 << 16
_MARKER = ".agegender-extracted"  # written last, so its presence means the extraction is complete
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def default_cache_dir() -> Path:
    """``$AGEGENDER_HOME``, else ``$XDG_CACHE_HOME/agegender``, else ``~/.cache/agegender``."""
    if home := os.environ.get("AGEGENDER_HOME"):
        return Path(home).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "agegender"
    return Path.home() / ".cache" / "agegender"


def extraction_dir(archive: Archive, dest: str | os.PathLike[str]) -> Path:
    return Path(dest) / archive.filename.removesuffix(".tar.gz")


def fetch(archive: Archive, dest: str | os.PathLike[str], *, url: str | None = None, extract: bool = True,
          progress: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download, verify and (optionally) unpack ``archive`` into ``dest``; return the directory or the archive.

    ``url`` overrides ``archive.url`` (a URL ending in ``/`` gets the file name appended). An interrupted
    download resumes from ``<filename>.part`` on the next call. Nothing is fetched if the file is already
    there and verifies.
    """
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AgeGenderError(f"{dest}: cannot create the download directory ({e.strerror or e})") from None
    path = dest / archive.filename
    if path.is_file():
        digest = _verify_present(archive, path)
    else:
        src = url or archive.url
        if src.endswith("/"):
            src += archive.filename
        log.info("fetching %s from %s (licence: %s)", archive.filename, src, archive.licence)
        digest = _download(archive, src, path, progress=progress, timeout=timeout)
    return _extract_once(archive, path, digest) if extract else path


def locate(archive: Archive, dest: str | os.PathLike[str] | None = None) -> Path:
    """The unpacked directory of ``archive`` under ``dest`` (default: the cache), or an error saying how to get it."""
    root = Path(dest) if dest is not None else default_cache_dir()
    target = extraction_dir(archive, root)
    if (target / _MARKER).is_file():
        return target
    command = f"agegender fetch {archive.key}"
    if dest is not None and root.expanduser().resolve() != default_cache_dir().resolve():
        command += f" --dest {shlex.quote(str(dest))}"
    raise AgeGenderError(f"{archive.filename} is not unpacked in {root}: run `{command}` "
                         f"or pass --{archive.key} PATH")


def safe_extract(tar_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Unpack a tar archive into ``dest``, refusing any member that could land outside it or is a device."""
    tar_path, dest = Path(tar_path), Path(dest)
    root = os.path.realpath(dest)
    # tarfile's "data" filter re-checks every path against the real filesystem at write time.
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            symlinks = {os.path.normpath(m.name) for m in members if m.issym()}
            for m in members:
                if problem := _unsafe_member(m, root, symlinks):
                    raise AgeGenderError(f"{tar_path}: refusing member {m.name!r}: {problem}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Python before 3.11.4; the checks above still ran
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise AgeGenderError(f"{tar_path}: cannot unpack ({e})") from None


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


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _expected_sha256(archive: Archive, path: Path) -> tuple[str | None, str]:
    """The sha256 to check against and where it comes from: published, recorded on first download, or none."""
    if archive.sha256:
        return archive.sha256.lower(), "the published sha256"
    record = _record_path(path)
    if not record.is_file():
        return None, ""
    words = record.read_text(encoding="utf-8", errors="replace").split()
    if not words or not _SHA256.fullmatch(words[0].lower()):
        raise AgeGenderError(f"{record}: not a sha256 record; delete it and rerun")
    return words[0].lower(), f"the sha256 recorded in {record.name}"


def _verify_present(archive: Archive, path: Path) -> str:
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        raise AgeGenderError(f"{path}: {size:,} bytes, expected {archive.size:,}; delete it and re-fetch")
    digest = sha256_file(path)
    expected, source = _expected_sha256(archive, path)
    if expected is None:
        write_text_atomic(_record_path(path), f"{digest}  {path.name}\n")
    elif digest != expected:
        raise AgeGenderError(f"{path}: sha256 {digest} does not match {source} ({expected}); "
                             f"delete it and re-fetch")
    return digest


def _download(archive: Archive, url: str, path: Path, *, progress: bool, timeout: float) -> str:
    part = path.with_name(path.name + ".part")
    digest = _stream(url, part, archive.size, progress=progress, timeout=timeout)
    expected, source = _expected_sha256(archive, path)
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        raise AgeGenderError(f"{url}: the download's sha256 {digest} does not match {source} ({expected}); "
                             f"nothing was kept")
    os.replace(part, path)
    if expected is None:
        write_text_atomic(_record_path(path), f"{digest}  {path.name}\n")
    return digest


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
        raise AgeGenderError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise AgeGenderError(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None

    with response:
        length = _int_header(response.headers.get("Content-Length"))
        if getattr(response, "status", None) == 206:  # file: URLs have no status and always send everything
            total = _check_content_range(url, part, response.headers.get("Content-Range", ""), offset, length)
        else:
            offset, total = 0, length
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise AgeGenderError(f"{url}: the server has {total:,} bytes but {part.name.removesuffix('.part')} "
                                 f"should be {size:,}; is the URL right?")
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
            with open(part, "ab" if offset else "wb") as f, tqdm(
                    total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=part.name.removesuffix(".part"), disable=None if progress else True) as bar:
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
        except OSError as e:
            raise AgeGenderError(f"{part}: cannot write ({e.strerror or e})") from None

    if expected is not None and got > expected:
        part.unlink()
        raise AgeGenderError(f"{url}: the server sent more than the expected {expected:,} bytes; nothing was kept")
    if dropped or (expected is not None and got < expected):
        of = f" of {expected:,}" if expected is not None else ""
        raise AgeGenderError(f"{url}: connection dropped at byte {got:,}{of}; the partial download "
                             f"is kept in {part}: rerun the same command to resume")
    return sha.hexdigest()


def _check_content_range(url: str, part: Path, header: str, offset: int, length: int | None) -> int | None:
    """The full size from a 206 answer's Content-Range, after checking it continues our partial file."""
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None or int(match[1]) != offset or (length is not None and int(match[2]) + 1 - offset != length):
        part.unlink()
        raise AgeGenderError(f"{url}: asked for bytes {offset:,}- but the server answered Content-Range "
                             f"{header!r} (Content-Length {length}); the partial download was deleted, "
                             f"rerun to start over")
    return None if match[3] == "*" else int(match[3])


def _int_header(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _extract_once(archive: Archive, path: Path, digest: str) -> Path:
    target = extraction_dir(archive, path.parent)
    if (target / _MARKER).is_file():
        return target
    if target.exists():
        raise AgeGenderError(f"{target}: exists but is not a complete extraction of {path.name}; "
                             f"move or delete it and rerun")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=path.parent))
    try:
        log.info("unpacking %s", path)
        safe_extract(path, tmp)
        if not (tmp / archive.extracted).exists():
            raise AgeGenderError(f"{path}: has no {archive.extracted}; is this the right archive?")
        (tmp / _MARKER).write_text(f"{digest}  {path.name}\n", encoding="utf-8")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
