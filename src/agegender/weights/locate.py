"""The one way to find a file the zoo describes: named by the caller, bundled, or carried by an installed package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import AgeGenderError
from .zoo import ZooFile


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


def find(entry: ZooFile, given: str | os.PathLike[str] | None = None) -> Path:
    """``given`` when named (it must exist), else ``entry``'s bundled copy (sha256-checked) or the installed
    package's copy; otherwise an error saying how to get it. A download is never looked for: its caller fetches it
    (:func:`agegender.weights.fetch.fetch`) or names the file."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise AgeGenderError(f"{path}: no such file ({entry.what})")
        return path
    if entry.bundled:
        return entry.verified()
    found = package_file(entry.package, entry.package_path) if entry.package and entry.package_path else None
    if found is None:
        raise AgeGenderError(f"{entry.filename}: not found ({entry.what}); {entry.install}")
    return found


def finds_itself(entry: ZooFile) -> bool:
    """Whether :func:`find` can find ``entry`` with nothing named (bundled, or its package is installed)."""
    return entry.bundled or bool(entry.package and entry.package_path and package_file(entry.package, entry.package_path))
