"""The one error type every ernieq failure the user can fix derives from.

The CLI turns an ``ErnieqError`` into a one-line message and exit code 1; any
other exception is a bug and keeps its traceback.
"""


class ErnieqError(Exception):
    """Bad input or environment: the message names the file, tensor or package."""
