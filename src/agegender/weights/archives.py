"""The published archives that `agegender fetch` downloads: where they live, their sizes, hashes and licences."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Archive:
    """A published file that `agegender fetch` downloads and verifies."""

    key: str
    filename: str
    url: str
    size: int | None  # bytes, when published
    sha256: str | None  # when unknown, recorded on first download and verified afterwards
    licence: str
    extracted: str  # a path inside the extraction directory that proves it is unpacked


VGG_FACE = Archive(
    key="weights",
    filename="vgg_face_torch.tar.gz",
    url="https://www.robots.ox.ac.uk/~vgg/software/vgg_face/src/vgg_face_torch.tar.gz",
    size=None,
    sha256=None,
    licence="VGG-Face: non-commercial research purposes only (Parkhi, Vedaldi, Zisserman, BMVC 2015)",
    extracted="vgg_face_torch/VGG_FACE.t7",
)

AGEGENDER_CLEANED = Archive(
    key="data",
    filename="agegender_cleaned.tar.gz",
    url="https://s3.amazonaws.com/matroid-web/datasets/agegender_cleaned.tar.gz",
    size=252_630_873,
    sha256=None,
    licence="Adience and IMDB-WIKI images: non-commercial research terms of the source datasets",
    extracted="combined",
)

ARCHIVES: dict[str, Archive] = {a.key: a for a in (VGG_FACE, AGEGENDER_CLEANED)}
