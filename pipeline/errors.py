"""The one exception type a user is meant to read."""


class PipelineError(Exception):
    """Bad input or a broken invariant, explained in one line that names the file, key or value.

    Stages print it as ``error: <message>`` and exit 1 instead of showing a traceback.
    """
