"""fetch: resumable verified downloads from a local HTTP server, and safe extraction."""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import stat
import tarfile
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agegender.cli import main
from agegender.errors import AgeGenderError
from agegender.weights import zoo as archives
from agegender.weights.fetch import default_cache_dir, fetch, locate, safe_extract
from agegender.weights.zoo import AGEGENDER_CLEANED, VGG_FACE
from agegender.weights.zoo import ZooFile as Archive

PAYLOAD = random.Random(0).randbytes(200_000)  # incompressible, so the archive is ~200 kB


@dataclass
class Server:
    """What the local server serves and how it misbehaves; ``requests`` holds each request's Range header."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[str | None] = field(default_factory=list)
    ranges: bool = True
    drop_after: int | None = None  # next request only: send this many body bytes, then close
    stall_after: int | None = None  # next request only: send this many body bytes, then hang
    release: threading.Event = field(default_factory=threading.Event)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        srv: Server = self.server.state  # type: ignore[attr-defined]
        srv.requests.append(self.headers.get("Range"))
        body = srv.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start, asked = 0, self.headers.get("Range")
        if asked and srv.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", asked)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if srv.drop_after is not None:
            payload, srv.drop_after = payload[: srv.drop_after], None
        if srv.stall_after is not None:
            self.wfile.write(payload[: srv.stall_after])
            self.wfile.flush()
            srv.stall_after = None
            srv.release.wait(10)
            return
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = srv = Server(base=f"http://127.0.0.1:{httpd.server_address[1]}/")  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield srv
    srv.release.set()
    httpd.shutdown()
    httpd.server_close()


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(
    name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info, (data if kind == tarfile.REGTYPE else None)


def good_archive() -> bytes:
    return tar_gz([member("pkg/data.bin", PAYLOAD), member("pkg/names.txt", b"a\nb\n")])


def serve(srv: Server, data: bytes, *, name: str = "pkg.tar.gz", known: bool = True) -> Archive:
    """Publish ``data`` on the server and describe it, with or without published size and sha256."""
    srv.files[name] = data
    return replace(
        VGG_FACE,
        filename=name,
        urls=(srv.base + name,),
        extracted="pkg/data.bin",
        size=len(data) if known else None,
        sha256=hashlib.sha256(data).hexdigest() if known else None,
    )


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AGEGENDER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "home"
    monkeypatch.delenv("AGEGENDER_HOME")
    assert default_cache_dir() == tmp_path / "xdg" / "agegender"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "agegender"


def test_full_download_extracts_once(server, tmp_path):
    data = good_archive()
    archive = serve(server, data)
    dest = tmp_path / "cache"
    out = fetch(archive, dest, progress=True)
    assert out == dest / "pkg"
    assert (out / "pkg" / "data.bin").read_bytes() == PAYLOAD
    assert (dest / "pkg.tar.gz").read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == ["pkg", "pkg.tar.gz"]  # no .part, no temp dir, no record
    assert fetch(archive, dest, progress=False) == out
    assert fetch(archive, dest, extract=False, progress=False) == dest / "pkg.tar.gz"
    assert server.requests == [None]


def test_resume_after_dropped_connection(server, tmp_path):
    data = good_archive()
    archive = serve(server, data)
    server.drop_after = 50_000
    with pytest.raises(AgeGenderError, match="rerun the same command") as e:
        fetch(archive, tmp_path, extract=False, progress=False)
    assert "\n" not in str(e.value)
    part = tmp_path / "pkg.tar.gz.part"
    assert part.stat().st_size == 50_000 and not (tmp_path / "pkg.tar.gz").exists()
    assert fetch(archive, tmp_path, extract=False, progress=False).read_bytes() == data
    assert server.requests == [None, "bytes=50000-"]
    assert not part.exists()


def test_read_timeout_keeps_the_part_for_resuming(server, tmp_path):
    data = good_archive()
    archive = serve(server, data)
    server.stall_after = 30_000
    with pytest.raises(AgeGenderError, match="rerun the same command"):
        fetch(archive, tmp_path, extract=False, progress=False, timeout=0.3)
    server.release.set()
    kept = (tmp_path / "pkg.tar.gz.part").stat().st_size
    assert 0 < kept <= 30_000
    assert fetch(archive, tmp_path, extract=False, progress=False).read_bytes() == data
    assert server.requests[-1] == f"bytes={kept}-"


def test_server_without_range_support_restarts_from_zero(server, tmp_path):
    data = good_archive()
    archive = serve(server, data)
    server.ranges = False
    (tmp_path / "pkg.tar.gz.part").write_bytes(b"junk" * 5_000)
    assert fetch(archive, tmp_path, extract=False, progress=False).read_bytes() == data
    assert server.requests == ["bytes=20000-"]


def test_complete_part_is_finished_without_downloading(server, tmp_path):
    data = good_archive()
    archive = serve(server, data, known=False)
    (tmp_path / "pkg.tar.gz.part").write_bytes(data)  # as if a run stopped just before the rename
    assert fetch(archive, tmp_path, extract=False, progress=False).read_bytes() == data
    assert server.requests == [f"bytes={len(data)}-"]  # answered 416 with the full size


def test_file_url_mirror(tmp_path):
    data = good_archive()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "pkg.tar.gz").write_bytes(data)
    archive = replace(VGG_FACE, filename="pkg.tar.gz", extracted="pkg/data.bin", size=len(data), sha256=None)
    (tmp_path / "pkg.tar.gz.part").write_bytes(b"junk")
    out = fetch(archive, tmp_path, url=mirror.as_uri() + "/", progress=False)
    assert (out / "pkg" / "data.bin").read_bytes() == PAYLOAD


def test_wrong_checksum_keeps_nothing(server, tmp_path):
    archive = replace(serve(server, good_archive()), sha256="0" * 64)
    with pytest.raises(AgeGenderError, match="sha256 .* does not match the published sha256"):
        fetch(archive, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_is_an_error(server, tmp_path):
    data = good_archive()
    archive = replace(serve(server, data), size=len(data) + 1)
    with pytest.raises(AgeGenderError, match=f"{len(data):,} bytes but pkg.tar.gz should be {len(data) + 1:,}"):
        fetch(archive, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_recorded_sha256_is_verified_later(server, tmp_path):
    data = good_archive()
    archive = serve(server, data, known=False)
    path = fetch(archive, tmp_path, extract=False, progress=False)
    record = tmp_path / "pkg.tar.gz.verified.sha256"
    assert record.read_text().split() == [hashlib.sha256(data).hexdigest(), "pkg.tar.gz"]

    # A damaged cached copy is deleted and downloaded again, then checked against the record.
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert fetch(archive, tmp_path, extract=False, progress=False).read_bytes() == data
    assert server.requests.count(None) == 2

    path.unlink()
    server.files["pkg.tar.gz"] = tar_gz([member("pkg/data.bin", b"new")])  # upstream changed, same name
    with pytest.raises(AgeGenderError, match=rf"recorded .* delete {re.escape(str(record))} and rerun") as e:
        fetch(archive, tmp_path, extract=False, progress=False)
    assert "\n" not in str(e.value)
    assert not path.exists() and server.requests.count(None) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg.tar.gz.verified.sha256"]


MALICIOUS = {
    "dotdot": lambda root: [member("../evil", b"x")],
    "absolute": lambda root: [member(str(root / "evil"), b"x")],
    "symlink_to_passwd": lambda root: [member("passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")],
    "symlink_up": lambda root: [member("a/up", kind=tarfile.SYMTYPE, link="../../evil")],
    "hardlink_outside": lambda root: [member("hl", kind=tarfile.LNKTYPE, link="../evil")],
    "device": lambda root: [member("null", kind=tarfile.CHRTYPE)],
    "symlink_chain": lambda root: [
        member("y", kind=tarfile.SYMTYPE, link="."),
        member("x", kind=tarfile.SYMTYPE, link="y/.."),
        member("x/evil", b"x"),
    ],
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_safe_extract_refuses(case, tmp_path):
    members = MALICIOUS[case](tmp_path)
    tar = tmp_path / "bad.tar.gz"
    tar.write_bytes(tar_gz([member("ok.txt", b"fine")] + members))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(AgeGenderError) as e:
        safe_extract(tar, dest)
    assert str(e.value).startswith(f"{tar}: refusing member ")
    assert any(f"member {info.name!r}:" in str(e.value) for info, _ in members)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "out"]
    assert list(dest.iterdir()) == []


def test_safe_extract_keeps_inner_links_and_drops_setuid(tmp_path):
    tar = tmp_path / "ok.tar.gz"
    tar.write_bytes(
        tar_gz(
            [
                member("a/f", b"data"),
                member("a/l", kind=tarfile.SYMTYPE, link="f"),
                member("a/h", kind=tarfile.LNKTYPE, link="a/f"),
                member("a/s", b"", mode=0o4755),
            ]
        )
    )
    safe_extract(tar, tmp_path / "out")
    a = tmp_path / "out" / "a"
    assert (a / "l").read_bytes() == (a / "h").read_bytes() == b"data"
    if hasattr(tarfile, "data_filter"):
        assert not (a / "s").stat().st_mode & stat.S_ISUID


def test_fetch_refuses_malicious_archive(server, tmp_path):
    archive = serve(server, tar_gz([member("pkg/data.bin", b"x"), member("../evil", b"x")]), known=False)
    with pytest.raises(AgeGenderError, match="refusing member '../evil'.*was deleted"):
        fetch(archive, tmp_path / "cache", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the cache folder it created is gone too
    for extract in (True, False):
        (tmp_path / "cache").mkdir(exist_ok=True)
        with pytest.raises(AgeGenderError, match="refusing member '../evil'"):
            fetch(archive, tmp_path / "cache", extract=extract, progress=False)
        assert list((tmp_path / "cache").iterdir()) == []


def test_archive_without_expected_content(server, tmp_path):
    archive = replace(serve(server, good_archive(), known=False), extracted="vgg_face_torch/VGG_FACE.t7")
    for extract in (True, False):
        with pytest.raises(AgeGenderError, match="has no vgg_face_torch/VGG_FACE.t7"):
            fetch(archive, tmp_path, extract=extract, progress=False)
        assert list(tmp_path.iterdir()) == []  # no archive, no record, no extraction


def test_http_404_names_the_url(server, tmp_path):
    url = server.base + "missing.tar.gz"
    with pytest.raises(AgeGenderError) as e:
        fetch(replace(VGG_FACE, urls=(url,)), tmp_path, progress=False)
    assert str(e.value).startswith(f"{url}: HTTP 404 Not Found; ")
    assert f"--url URL, or download vgg_face_torch.tar.gz yourself to {tmp_path / 'vgg_face_torch.tar.gz'}" in str(e.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("archive", "instead"), [(VGG_FACE, "--weights FILE"), (AGEGENDER_CLEANED, "--data DIR")])
def test_offline_names_the_alternative(tmp_path, archive, instead):
    port = _closed_port()
    mirrors = tuple(f"http://127.0.0.1:{port}/{i}/{archive.filename}" for i in range(2))
    with pytest.raises(AgeGenderError) as e:
        fetch(replace(archive, urls=mirrors), tmp_path / "cache", progress=False)
    message = str(e.value)
    assert "\n" not in message and all(f"{m}: cannot download" in message for m in mirrors)
    assert "check the network" in message and f"take {instead}" in message
    assert str(tmp_path / "cache" / archive.filename) in message
    assert not (tmp_path / "cache").exists()


def test_locate_names_the_command(server, monkeypatch, tmp_path):
    monkeypatch.setenv("AGEGENDER_HOME", str(tmp_path / "home"))
    with pytest.raises(AgeGenderError, match=r"run `agegender fetch data` or pass --data PATH"):
        locate(AGEGENDER_CLEANED)
    other = tmp_path / "other"
    with pytest.raises(
        AgeGenderError,
        match=rf"run `agegender fetch weights --dest {re.escape(str(other))}` "
        r"or pass --weights PATH",
    ):
        locate(VGG_FACE, other)
    archive = serve(server, good_archive())
    assert fetch(archive, other, progress=False) == locate(archive, other) == other / "pkg"


def test_cli_fetch_data(server, monkeypatch, tmp_path, capsys):
    data = tar_gz([member("combined/aligned/01_F/a.jpg", b"jpeg")])
    server.files["agegender_cleaned.tar.gz"] = data
    monkeypatch.setitem(archives.ARCHIVES, "data", replace(AGEGENDER_CLEANED, urls=(server.base + "unused/",), size=len(data)))
    dest = tmp_path / "d"
    assert main(["fetch", "data", "--dest", str(dest), "--url", server.base + "agegender_cleaned.tar.gz", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(dest / "agegender_cleaned")
    assert (dest / "agegender_cleaned" / "combined" / "aligned" / "01_F" / "a.jpg").read_bytes() == b"jpeg"

    assert main(["fetch", "data", "--dest", str(tmp_path / "e"), "--url", server.base, "--no-extract", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "e" / "agegender_cleaned.tar.gz")

    assert main(["fetch", "data", "--dest", str(tmp_path / "f"), "--url", server.base + "nope", "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # log lines may come first when logging goes to stderr
    assert err.startswith("agegender: error: no mirror gave a good copy of agegender_cleaned.tar.gz (")
    assert f"{server.base}nope: HTTP 404 Not Found; {server.base}unused/agegender_cleaned.tar.gz: HTTP 404" in err
    assert "--data DIR" in err and not (tmp_path / "f").exists()


# ---------------------------------------------------------------------------------------------
# mirrors, checks that delete what failed, and a recorded sha256 that only a good archive can set
# ---------------------------------------------------------------------------------------------


def test_vgg_face_has_both_mirrors_in_order():
    assert VGG_FACE.urls == (
        "https://www.robots.ox.ac.uk/~vgg/software/vgg_face/src/vgg_face_torch.tar.gz",
        "https://m-training.s3-us-west-2.amazonaws.com/dlchallenge/vgg_face_torch.tar.gz",
    )
    assert VGG_FACE.url == VGG_FACE.urls[0]
    assert all(a.urls and a.instead for a in archives.ARCHIVES.values())


def test_mirrors_are_tried_in_turn(server, tmp_path):
    data = good_archive()
    server.files["garbage/pkg.tar.gz"] = b"<html>not found</html>"
    server.files["good/pkg.tar.gz"] = data
    archive = replace(
        serve(server, data, known=False),
        urls=(server.base + "gone/pkg.tar.gz", server.base + "garbage/pkg.tar.gz", server.base + "good/pkg.tar.gz"),
    )
    out = fetch(archive, tmp_path, progress=False)
    assert (out / "pkg" / "data.bin").read_bytes() == PAYLOAD
    assert server.requests == [None, None, None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "pkg.tar.gz", "pkg.tar.gz.verified.sha256"]
    assert (tmp_path / "pkg.tar.gz.verified.sha256").read_text().split()[0] == hashlib.sha256(data).hexdigest()


def test_url_is_tried_before_the_mirrors(server, tmp_path):
    data = good_archive()
    archive = serve(server, data)
    server.files["mirror/pkg.tar.gz"] = data
    fetch(archive, tmp_path, url=server.base + "mirror/", extract=False, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "pkg.tar.gz"] and len(server.requests) == 1


@pytest.mark.parametrize("extract", [True, False])
def test_garbage_is_deleted_and_never_trusted(server, tmp_path, extract):
    server.files["bad/pkg.tar.gz"] = b"<html>an error page, served with 200</html>"
    server.files["good/pkg.tar.gz"] = good_archive()
    archive = replace(serve(server, b"", known=False), urls=(server.base + "bad/pkg.tar.gz",))
    with pytest.raises(AgeGenderError) as e:
        fetch(archive, tmp_path, extract=extract, progress=False)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'pkg.tar.gz'}: not a readable tar archive") or "cannot unpack" in message
    assert "\n" not in message and "was deleted" in message and "--url URL" in message
    assert str(tmp_path / "pkg.tar.gz") in message and "--weights FILE" in message
    assert list(tmp_path.iterdir()) == []  # no archive, no .part, no record

    # A new mirror is not held back by anything the garbage left.
    out = fetch(archive, tmp_path, url=server.base + "good/pkg.tar.gz", extract=extract, progress=False)
    assert out == (tmp_path / "pkg" if extract else tmp_path / "pkg.tar.gz")


def test_a_sha256_recorded_from_garbage_by_an_older_version_is_dropped(server, tmp_path):
    garbage = b"<html>error</html>"
    (tmp_path / "pkg.tar.gz").write_bytes(garbage)
    (tmp_path / "pkg.tar.gz.sha256").write_text(f"{hashlib.sha256(garbage).hexdigest()}  pkg.tar.gz\n")
    data = good_archive()
    archive = serve(server, data, known=False)
    out = fetch(archive, tmp_path, url=server.base + "pkg.tar.gz", progress=False)
    assert (out / "pkg" / "data.bin").read_bytes() == PAYLOAD
    assert not (tmp_path / "pkg.tar.gz.sha256").exists()
    assert (tmp_path / "pkg.tar.gz.verified.sha256").read_text().split()[0] == hashlib.sha256(data).hexdigest()


def test_a_sha256_recorded_by_an_older_version_is_kept_when_its_extraction_agrees(server, tmp_path):
    data = good_archive()
    archive = serve(server, data, known=False)
    fetch(archive, tmp_path, progress=False)
    record = tmp_path / "pkg.tar.gz.verified.sha256"
    record.rename(tmp_path / "pkg.tar.gz.sha256")  # as an older version left it
    fetch(archive, tmp_path, progress=False)
    assert record.is_file() and not (tmp_path / "pkg.tar.gz.sha256").exists()


def test_a_manually_placed_file_is_checked_and_used_offline(tmp_path):
    data = good_archive()
    (tmp_path / "pkg.tar.gz").write_bytes(data)
    archive = replace(
        VGG_FACE, filename="pkg.tar.gz", extracted="pkg/data.bin", urls=(f"http://127.0.0.1:{_closed_port()}/pkg.tar.gz",)
    )
    out = fetch(archive, tmp_path, progress=False)
    assert (out / "pkg" / "data.bin").read_bytes() == PAYLOAD
    assert (tmp_path / "pkg.tar.gz.verified.sha256").is_file()


def test_an_existing_partial_extraction_is_refused_before_downloading(server, tmp_path):
    archive = serve(server, good_archive())
    (tmp_path / "pkg").mkdir()
    with pytest.raises(AgeGenderError, match="exists but is not a complete extraction"):
        fetch(archive, tmp_path, progress=False)
    assert server.requests == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
