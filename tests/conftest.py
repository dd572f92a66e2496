"""Shared fixtures. Real photos come from ../shared/faces (or $AGEGENDER_FACES) and skip when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def faces_dir() -> Path | None:
    env = os.environ.get("AGEGENDER_FACES")
    candidates = [Path(env)] if env else [REPO.parent / "shared" / "faces", REPO.parent.parent / "shared" / "faces"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture
def shared_faces() -> Path:
    d = faces_dir()
    if d is None:
        pytest.skip("real face photos (../shared/faces) not available")
    return d
