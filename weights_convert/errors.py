"""The one exception of weights_convert."""
from __future__ import annotations


class WeightsError(ValueError):
    """A problem with a weights file or a weights dict (a user mistake, not a bug).

    The message is a single line: the CLI prints it as is (``weights-convert: error: ...``)
    and exits with code 2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: object) -> str:
    """Collapse any whitespace run (newlines included) into one space."""
    return " ".join(str(text).split())
