"""The one user-facing error type. The CLI prints it as one line and exits with code 2."""


class PipelineError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


EXIT_USER_ERROR = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a one-line
    error quotes of a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
