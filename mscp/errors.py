"""The one exception type users see: a clear, one-line reason; the command line exits with 2.
Warnings go one way too (`warn`): to the `mscp` logger, for library users to route, and as an
`MSCPWarning`, which the command line prints as one line."""
import logging
import warnings

log = logging.getLogger("mscp")
log.addHandler(logging.NullHandler())  # a library: silent until the application configures logging


class MSCPError(Exception):
    """Bad input or an impossible request. The message is one line and names the culprit."""


class MSCPWarning(UserWarning):
    """Input used other than as given (e.g. a large prompt set sampled); the command line prints it
    as one line, `mscp: warning: ...`."""


def warn(message: str, *, stacklevel: int = 2) -> None:
    """One warning, to the `mscp` logger and as an MSCPWarning (stacklevel as for warnings.warn)."""
    log.warning(message)
    warnings.warn(MSCPWarning(message), stacklevel=stacklevel + 1)
