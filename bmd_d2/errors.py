"""The one exception type for problems a user can fix (bad input, bad config, missing files).

Every message is one line and names the file/series and the problem. Command-line tools catch ``BMDError`` and turn
it into ``error: <message>`` on stderr with a non-zero exit code; anything else is a bug and keeps its traceback.
"""


def one_line(text) -> str:
    """``text`` (any object, as ``str``) with every run of white space, newlines included, folded to one space."""
    return " ".join(str(text).split())


class BMDError(Exception):
    """A user-facing error: one line naming the file or series and the problem."""

    def __init__(self, message: str, *, path=None):
        message = one_line(message)
        if path is not None and str(path) not in message:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = path
