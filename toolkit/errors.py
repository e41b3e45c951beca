"""The one exception type a user can cause; the CLI turns it into one red line and exit 2."""


class ToolkitError(Exception):
    """A problem the user can fix (bad name, missing data, wrong checkpoint...).

    The message must say what went wrong *and* how to fix it.
    """
