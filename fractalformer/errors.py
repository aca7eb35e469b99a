"""One exception type for every user-facing failure.

The CLI turns a :class:`FractalError` into a one-line message and a non-zero exit, so
code anywhere in the package can reject bad input without printing a traceback.
"""


class FractalError(Exception):
    """A problem with the user's input (file, config, checkpoint, argument)."""


class UnknownCharacterError(FractalError):
    """Text with a character the tokenizer lacks. The message names the library's ``on_unknown``;
    :meth:`advice` lets a command name its own options instead."""

    def __init__(self, what: str, replacement: str) -> None:
        self.what, self.replacement = what, replacement
        super().__init__(self.advice("on_unknown='replace'", "the char and byte tokenizers take any text"))

    def advice(self, replace: str, other: str | None = None) -> str:
        """The message with ``replace`` as the way to replace unknown characters (and ``other``,
        another way out)."""
        tail = f"; {other}" if other else ""
        return f"{self.what} ({replace} maps unknown characters to {self.replacement!r}{tail})"
