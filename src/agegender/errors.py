"""The exception types that reach users as a one-line message, and the one way to make that line."""

from __future__ import annotations

import re
from collections.abc import Callable


class AgeGenderError(Exception):
    """A problem with the user's input or environment, phrased for the user.

    The CLI prints ``str(error)`` on one line and exits non-zero; tracebacks are for bugs only.
    Messages name the file and the problem, e.g. ``"model.t7: truncated at byte 1234"``.
    """


class InputError(AgeGenderError, ValueError):
    """A value a function cannot use: an array of the wrong shape, metadata that breaks its schema, weights of
    other shapes. A ``ValueError`` too, so ``except ValueError`` written before it existed still catches it."""


class OptionError(InputError):
    """A parameter's value the library refuses, or a problem a parameter resolves, named as the caller named it.

    The message writes each parameter in backticks, e.g. ``OptionError("`max_faces` must be at least 1, got 0",
    "max_faces")``. ``str()`` speaks to Python callers (``max_faces must be ...``); :meth:`for_cli` speaks to the
    command line (``--max-faces must be ...``), which is how ``agegender`` prints it. Only the backticked names
    given in ``parameters`` are rewritten, so a path or value in the message is never touched.
    """

    def __init__(self, message: str, *parameters: str) -> None:
        if not parameters:
            raise TypeError("OptionError needs the name of the parameter it is about")
        self.template = message
        self.parameters = parameters
        super().__init__(self._render(lambda name: name))

    @property
    def parameter(self) -> str:
        """The parameter the error is about (the first one named)."""
        return self.parameters[0]

    def for_cli(self, flags: dict[str, str] | None = None) -> str:
        """The message with each parameter as its command-line flag: ``flags[name]``, else ``--`` and the name
        with dashes for underscores."""
        flags = flags or {}
        return self._render(lambda name: flags.get(name, "--" + name.replace("_", "-")))

    def _render(self, spell: Callable[[str], str]) -> str:
        text = self.template
        for name in self.parameters:
            text = text.replace(f"`{name}`", spell(name))
        return text

    def __reduce__(self) -> tuple[object, ...]:  # picklable (Ray ships errors between processes)
        return (type(self), (self.template, *self.parameters))


_TERMINAL_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(error: BaseException | str, limit: int = 200, *, with_type: bool = False) -> str:
    """An exception's message (or a text) as one line for a message of ours: terminal escapes dropped, every run
    of whitespace (newlines included) one space, at most ``limit`` characters.

    An exception with no message gives its type's name, so the line is never empty; ``with_type`` puts the
    type's name first (``"OSError: disk full"``), for messages from libraries whose exception type says a lot.
    """
    text = " ".join(_TERMINAL_ESCAPES.sub("", str(error)).split())[:limit]
    if not isinstance(error, BaseException):
        return text
    kind = type(error).__name__
    if not text:
        return kind
    return f"{kind}: {text}" if with_type else text
