"""The one exception type a user is meant to read."""


class PipelineError(Exception):
    """Bad input or a broken invariant in one line naming the file, key or value: stages print it, exit 1."""
