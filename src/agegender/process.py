"""Process-wide state that agegender sets: thread pools, scoped and restored, and the environment, in one place.

Torch-free at import: nothing here loads torch or OpenCV that the caller has not loaded itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from types import TracebackType

from .errors import OptionError

log = logging.getLogger(__name__)

# Environment variables that :func:`configure` sets where the user has not: each is read once, when its
# library starts, so they must be in place before torch (OpenMP) loads.
TUNING = {
    # OpenMP threads that spin at barriers lose most of their speed when other processes share the cores
    # (dlib ResNet, 2 threads on a busy 2-core machine: 55 img/s spinning, 267 passive).
    "OMP_WAIT_POLICY": "PASSIVE",
}


def configure() -> dict[str, str]:
    """Tune this process for agegender: the variables of :data:`TUNING`, each only where it is not already set.

    The ``agegender`` command calls it first; Python users may call it, before the first ``import torch``
    (OpenMP reads its settings once, when torch loads). Returns the variables it set. Settings that only an
    import needs (Keras's backend) are not here: :func:`env_defaults` holds them for that import alone.
    """
    added = {k: v for k, v in TUNING.items() if k not in os.environ}
    os.environ.update(added)
    if added and "torch" in sys.modules:
        log.debug("configure(): torch is already loaded; %s apply to processes started from here", ", ".join(added))
    return added


@contextlib.contextmanager
def env_defaults(**values: str) -> Iterator[None]:
    """Set the environment variables not already set, for the block only, then put the environment back.

    For settings read once at import (Keras's backend, TensorFlow's log level): the import sees them, and
    nothing of them is left behind for the rest of the process or the processes it starts.
    """
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class ThreadScope:
    """The process-wide thread pools as they are now, put back by :meth:`restore` or on leaving a ``with`` block.

    The pools are OpenCV's (``cv2.setNumThreads``) and torch's intra-op pool (``torch.set_num_threads``), each
    if its library is loaded: a library loaded later is not restored. onnxruntime has no process-wide pool (its
    threads belong to each session). Torch's inter-op pool is not here: torch allows it to be set only once,
    before any parallel work, so nothing in agegender sets it.
    """

    def __init__(self) -> None:
        self.opencv: int | None = None
        self.torch: int | None = None
        if "cv2" in sys.modules:
            self.opencv = sys.modules["cv2"].getNumThreads()
        if "torch" in sys.modules:
            self.torch = sys.modules["torch"].get_num_threads()

    def restore(self) -> None:
        if self.opencv is not None:
            sys.modules["cv2"].setNumThreads(self.opencv)
        if self.torch is not None and sys.modules["torch"].get_num_threads() != self.torch:
            sys.modules["torch"].set_num_threads(self.torch)  # only on a change: each call resizes OpenMP's pool

    def __enter__(self) -> ThreadScope:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.restore()


def set_process_threads(threads: int, *, opencv: bool = True, torch: bool = True) -> ThreadScope:
    """Size the process-wide pools to ``threads`` now: OpenCV's (loaded if needed) if ``opencv``, torch's if
    ``torch`` and torch is loaded (never loaded for this: ONNX inference runs without it).

    Returns the scope from before the change: ``with set_process_threads(1): ...`` restores the pools after the
    block, as ``torch.set_grad_enabled`` does; a plain call leaves them set, for a process that is all the
    caller's (a worker, a benchmark).
    """
    if threads < 1:
        raise OptionError(f"`threads` must be at least 1, got {threads}", "threads")
    if opencv:
        import cv2  # noqa: F401 - loaded before the snapshot, so that the scope restores it
    scope = ThreadScope()
    if opencv:
        sys.modules["cv2"].setNumThreads(threads)
    if torch and scope.torch is not None:
        sys.modules["torch"].set_num_threads(threads)
    return scope
