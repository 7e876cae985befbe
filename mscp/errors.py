"""The one exception type users see: a clear, one-line reason; the command line exits with 2."""


class MSCPError(Exception):
    """Bad input or an impossible request. The message is one line and names the culprit."""


class MSCPWarning(UserWarning):
    """Input used other than as given (e.g. a large prompt set sampled); the command line prints it
    as one line, `mscp: warning: ...`."""
