"""Run the test files twice in one process, the second time in reverse order, and compare the outcomes and the
thread pools: a test that leaves process state behind (threads, environment) shows up as a difference.

    python tests/run_twice.py tests/test_*.py        # the fast lane (-m "not slow") of each file
"""

from __future__ import annotations

import sys
from typing import Any

import pytest


class Outcomes:
    def __init__(self) -> None:
        self.by_test: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.by_test[report.nodeid] = report.outcome


def pools() -> tuple[int, int]:
    import cv2
    import torch

    return torch.get_num_threads(), cv2.getNumThreads()


def run(files: list[str]) -> dict[str, str]:
    got = Outcomes()
    before = pools()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-m", "not slow", *files], plugins=[got])
    print(f"exit {rc}; thread pools (torch, OpenCV) before {before}, after {pools()}", flush=True)
    return got.by_test


def main(files: list[str]) -> int:
    first = run(files)
    second = run(list(reversed(files)))
    differ = {k: (first.get(k), second.get(k)) for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    print(f"{len(first)} outcomes; first run {sorted(set(first.values()))}, second {sorted(set(second.values()))}")
    print("differences:", differ or "none")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
