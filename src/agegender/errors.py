"""The one exception type that reaches users as a one-line message."""


class AgeGenderError(Exception):
    """A problem with the user's input or environment, phrased for the user.

    The CLI prints ``str(error)`` on one line and exits non-zero; tracebacks are for bugs only.
    Messages name the file and the problem, e.g. ``"model.t7: truncated at byte 1234"``.
    """
