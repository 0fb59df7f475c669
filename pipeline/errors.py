"""The one user-facing error type. The CLI prints it as one line and exits with code 2."""


class PipelineError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


EXIT_USER_ERROR = 2
