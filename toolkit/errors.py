"""The one exception type a user can cause; the CLI turns it into one red line and exit 2."""

import re


class ToolkitError(Exception):
    """A problem the user can fix (bad name, missing data, wrong checkpoint...).

    The message must say what went wrong *and* how to fix it.
    """


# Two ways to quote a library's error inside one of ours: its first line as it stands (image
# and ONNX errors), or its most informative first sentence (torch's multi-line messages).


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's error, cut to `limit` characters, to quote inside one of
    ours; the exception's type name when it has no message."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def error_summary(exc: BaseException, limit: int = 160) -> str:
    """One informative line of a library's (often multi-line, sometimes coloured) message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # "Error(s) in loading state_dict for Sequential:" says less than the line after it.
    useful = [line for line in lines if not line.endswith(":")] or lines
    if not useful:
        return type(exc).__name__
    line = useful[0].split(". ")[0]  # the first sentence; the rest is usually advice
    return line if len(line) <= limit else line[: limit - 1] + "…"
