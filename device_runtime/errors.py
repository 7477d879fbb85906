"""The user-facing error type shared by both sides.

Anything a user can cause (bad file, wrong argument, corrupt patch) raises a subclass of
`MntoolError`; the CLI prints its message as one line and exits non-zero. Every other exception
is a bug and keeps its traceback.
"""


class MntoolError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1
