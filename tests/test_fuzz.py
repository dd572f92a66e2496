"""Fuzzing, bounded in time: the image decoder, the labels.csv parser and the HTTP API never fail but as designed.

- ``load_image`` on arbitrary and on mutated real image bytes raises only :class:`ImageError`;
- ``scan`` of a labels.csv with arbitrary text or bytes raises only :class:`AgeGenderError`;
- schemathesis drives the service from its OpenAPI schema: no generated request gets a 5xx.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agegender.data.records import scan
from agegender.errors import AgeGenderError
from agegender.images import ImageError, load_image

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
# Pillow warns (UserWarning) about the damaged TIFF and EXIF data the mutations make; refusing them is the point.
quiet = pytest.mark.filterwarnings("ignore::UserWarning")


def _seed_images() -> list[bytes]:
    """Small valid files in every format the decoder takes, to mutate."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    out = []
    for fmt, image, kw in [
        ("PNG", rgb, {}),
        ("JPEG", rgb, {"quality": 80}),
        ("JPEG", rgb, {"progressive": True}),
        ("GIF", rgb.convert("P"), {}),
        ("BMP", rgb, {}),
        ("TIFF", rgb, {}),
        ("WEBP", rgb, {}),
        ("PPM", rgb, {}),
        ("PNG", rgb.convert("RGBA"), {}),
        ("PNG", rgb.convert("I;16"), {}),
        ("TIFF", rgb.convert("CMYK"), {}),
    ]:
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


def _decodes_or_refuses(data: bytes) -> None:
    try:
        rgb = load_image(data, "fuzz.bin")
    except ImageError as e:
        assert str(e).startswith("fuzz.bin: ") and e.kind in ("unsupported", "corrupt", "too_large")
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@quiet
@FUZZ
@given(st.binary(max_size=4096))
def test_decoder_on_arbitrary_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


@quiet
@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.integers(0, 10**6) | st.none(),
)
def test_decoder_on_mutated_images(seed: bytes, flips: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(seed)
    for at, value in flips:
        data[at % len(data)] = value
    _decodes_or_refuses(bytes(data[: cut % len(data)] if cut is not None else data))


# ---------------------------------------------------------------------------------------------
# labels.csv
# ---------------------------------------------------------------------------------------------

COLUMNS = ["path", "filename", "gender", "age", "identity", "race", "Path", " GENDER ", "", "extra"]
CELLS = [
    "a.jpg",
    "b.png",
    "missing.jpg",
    "../a.jpg",
    "/etc/hostname",
    "sub/",
    "",
    "F",
    "m",
    "Male",
    "x",
    "29",
    "20-29",
    "40-30",
    "1000-2000",
    "-5",
    "200",
    "70+",
    "1e3",
    "nan",
    "9" * 5000,
    "\x00",
    "a" * 300,
    '"',
    "\r",
    "é",
    "٣",
]


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        Image.new("RGB", (8, 8), (90, 60, 30)).save(root / "a.jpg")
        Image.new("RGB", (8, 8), (30, 60, 90)).save(root / "b.png")
        yield root


def _scan_refuses_only_as_designed(root: Path, data: bytes) -> None:
    (root / "labels.csv").write_bytes(data)
    try:
        ds = scan(root / "labels.csv")
    except AgeGenderError as e:
        assert str(e)
        return
    for r in ds.records:
        assert r.gender in (0, 1) and (r.age is None or 0 <= r.age <= 120) and r.path.is_file()


@FUZZ
@given(
    data=st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=6).flatmap(
        lambda header: st.tuples(
            st.just(header),
            st.lists(st.lists(st.sampled_from(CELLS) | st.text(max_size=12), min_size=0, max_size=len(header) + 1), max_size=6),
        )
    )
)
def test_labels_csv_structured(folder: Path, data: tuple[list[str], list[list[str]]]) -> None:
    import csv

    header, rows = data
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    _scan_refuses_only_as_designed(folder, buf.getvalue().encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_labels_csv_arbitrary_text(folder: Path, text: str) -> None:
    _scan_refuses_only_as_designed(folder, ("path,gender,age\n" + text).encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.binary(max_size=400))
def test_labels_csv_arbitrary_bytes(folder: Path, data: bytes) -> None:
    _scan_refuses_only_as_designed(folder, data)


# ---------------------------------------------------------------------------------------------
# the HTTP API, from its OpenAPI schema
# ---------------------------------------------------------------------------------------------

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> object:
    from agegender.infer.predict import Predictor
    from agegender.infer.serve import create_app
    from test_predict import make_checkpoint

    checkpoint = make_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny.safetensors")
    app = create_app(Predictor.from_path(checkpoint), max_bytes=200_000, model_name="tiny.safetensors")
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@quiet
@pytest.mark.slow
def test_api_never_answers_5xx(api_schema: object) -> None:
    """Positive and negative requests for every operation; some uploads carry real (mutated) images.

    (Hypothesis is driven directly: schemathesis' pytest fixture integration does not run under pytest 9.)
    """
    from schemathesis import GenerationMode

    calls: list[tuple[str, int]] = []
    for result in api_schema.get_all_operations():  # type: ignore[attr-defined]
        operation = result.ok()
        cases = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in GenerationMode))

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=cases, image=st.none() | st.sampled_from(SEEDS), cut=st.integers(1, 4000))
        def run(case: object, image: bytes | None, cut: int) -> None:
            if image is not None and isinstance(getattr(case, "body", None), dict):
                case.body = {**case.body, "file": image[:cut]}  # type: ignore[attr-defined]
            response = case.call()  # type: ignore[attr-defined]
            calls.append((f"{case.method} {case.path}", response.status_code))  # type: ignore[attr-defined]
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"  # type: ignore[attr-defined]
            if response.status_code >= 400:
                detail = response.json()["detail"]
                assert detail and (not isinstance(detail, str) or "\n" not in detail)

        run()
    statuses = sorted({s for _, s in calls})
    print(
        f"\nschemathesis: {len(calls)} generated requests "
        f"({', '.join(f'{op}: {sum(1 for o, _ in calls if o == op)}' for op in sorted({o for o, _ in calls}))}), "
        f"statuses {statuses}"
    )
    assert sum(1 for op, _ in calls if op == "POST /predict") >= 40 and 200 in statuses
