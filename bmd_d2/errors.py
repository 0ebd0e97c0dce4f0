"""The one exception type for problems a user can fix (bad input, bad config, missing files).

Every message is one line and names the file/series and the problem. Command-line tools catch ``BMDError`` and turn
it into ``error: <message>`` on stderr with a non-zero exit code; anything else is a bug and keeps its traceback.
"""


class BMDError(Exception):
    """A user-facing error: one line naming the file or series and the problem."""

    def __init__(self, message: str, *, path=None):
        message = " ".join(str(message).split())  # always one line
        if path is not None and str(path) not in message:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = path
