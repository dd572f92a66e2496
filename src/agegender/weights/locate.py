"""Pretrained files that an installed package carries, found without importing the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import AgeGenderError
from ..model.backbones import WeightFile


def package_file(package: str, relative: str) -> Path | None:
    """``relative`` inside the installed ``package``, or None; the package's code is never run."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    return None


def packaged_weights(weights: WeightFile) -> Path:
    """The installed copy of ``weights``, or an error naming the command that installs it."""
    found = package_file(weights.package, weights.package_path) if weights.package and weights.package_path else None
    if found is None:
        raise AgeGenderError(f"{weights.filename}: not found; get it with {weights.how_to_get}")
    return found
