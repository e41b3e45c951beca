"""The one exception type a user can cause; the CLI turns it into one red line and exit 2."""


class ToolkitError(Exception):
    """A problem the user can fix (bad name, missing data, wrong checkpoint...).

    The message must say what went wrong *and* how to fix it.
    """


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's error, cut to `limit` characters, to quote inside one of
    ours; the exception's type name when it has no message."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
