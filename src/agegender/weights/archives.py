"""The published archives that `agegender fetch` downloads: where they live, their sizes, hashes and licences."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Archive:
    """A published file that `agegender fetch` downloads and verifies."""

    key: str
    filename: str
    urls: tuple[str, ...]  # mirrors, tried in this order
    size: int | None  # bytes, when published
    sha256: str | None  # when unknown, recorded once the archive has extracted and checked out
    licence: str
    extracted: str  # a path inside the extraction directory that proves it is unpacked
    instead: str = ""  # the option that makes the commands needing this archive use a local copy instead

    @property
    def url(self) -> str:
        """The first mirror."""
        return self.urls[0]


VGG_FACE = Archive(
    key="weights",
    filename="vgg_face_torch.tar.gz",
    urls=("https://www.robots.ox.ac.uk/~vgg/software/vgg_face/src/vgg_face_torch.tar.gz",
          "https://m-training.s3-us-west-2.amazonaws.com/dlchallenge/vgg_face_torch.tar.gz"),
    size=None,
    sha256=None,
    licence="VGG-Face: non-commercial research purposes only (Parkhi, Vedaldi, Zisserman, BMVC 2015)",
    extracted="vgg_face_torch/VGG_FACE.t7",
    instead="--weights FILE (VGG_FACE.t7 or a converted .safetensors)",
)

AGEGENDER_CLEANED = Archive(
    key="data",
    filename="agegender_cleaned.tar.gz",
    urls=("https://s3.amazonaws.com/matroid-web/datasets/agegender_cleaned.tar.gz",),
    size=252_630_873,
    sha256=None,
    licence="Adience and IMDB-WIKI images: non-commercial research terms of the source datasets",
    extracted="combined",
    instead="--data DIR (a labelled folder you already have)",
)

ARCHIVES: dict[str, Archive] = {a.key: a for a in (VGG_FACE, AGEGENDER_CLEANED)}
