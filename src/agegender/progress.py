"""Progress of long loops: a bar on a terminal, a log line every few seconds elsewhere.

tqdm is optional (the light install may lack it): without it, or when stderr is not a terminal (a log file, a
pipe, a CI job), the loop logs ``desc: done/total unit (rate/s)`` at most once every ``LOG_EVERY_S`` seconds,
so a redirected long job is never silent and never floods its log.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("agegender.progress")

LOG_EVERY_S = 5.0


def _bar(total: int | None, desc: str, unit: str) -> Any:
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


class Progress:
    """``update(n)`` as work completes; a context manager that closes the bar. ``enabled=False``: silent."""

    def __init__(self, total: int | None, desc: str, unit: str = "img", enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.enabled = enabled
        self._bar = _bar(total, desc, unit) if enabled else None
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self._last >= LOG_EVERY_S:
            self._last = now
            of = f"/{self.total}" if self.total is not None else ""
            rate = self.done / max(now - self._start, 1e-9)
            log.info("%s: %d%s %s (%.1f %s/s)", self.desc, self.done, of, self.unit, rate, self.unit)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
