"""One exception type for every error a user can cause.

The CLI turns an :class:`IclgdError` into a one-line message and exit status 2; any other
exception is a bug in iclgd and keeps its traceback.
"""


class IclgdError(Exception):
    """A user-caused error (bad option, missing or malformed data, unsupported model).

    The message must be a single line that names the file, line or option and says what was
    expected.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))
