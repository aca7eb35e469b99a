"""One exception type for every user-facing failure.

The CLI turns a :class:`FractalError` into a one-line message and a non-zero exit, so
code anywhere in the package can reject bad input without printing a traceback.
"""


class FractalError(Exception):
    """A problem with the user's input (file, config, checkpoint, argument)."""
