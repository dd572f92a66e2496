"""Test-only kill points: named places where a test can make this process die by SIGKILL.

A process killed by SIGKILL (the OOM killer, a preempted node, ``kill -9``) runs no cleanup, so what it wrote up to
that moment must already be a state the next run can use. Tests check that by setting
``AGEGENDER_TEST_KILL_AT=NAME`` (or ``NAME@N``, the N-th time the process passes ``NAME``, counting from 1): the
process kills itself there, deterministically, instead of a test sleeping and hoping to hit the moment.

Unset (always, outside tests), a kill point costs one environment lookup. This module is the only place that reads
the variable.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "AGEGENDER_TEST_KILL_AT"

_passed: dict[str, int] = {}
_lock = threading.Lock()


def kill_point(name: str) -> None:
    """Die here by SIGKILL when ``AGEGENDER_TEST_KILL_AT`` names this point (and this is its N-th pass)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    target, _, nth = wanted.rpartition("@") if "@" in wanted else (wanted, "", "1")
    if target != name:
        return
    with _lock:
        _passed[name] = _passed.get(name, 0) + 1
        if _passed[name] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
