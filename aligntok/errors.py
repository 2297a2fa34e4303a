"""The base of every expected, user-facing error: the CLI prints it as one line (no traceback)."""

from __future__ import annotations


class AligntokError(Exception):
    """Bad input or a failed precondition; the message names the file, key or value at fault."""


def one_line(exc: BaseException, limit: int = 240) -> str:
    """A third-party exception as one line for an `AligntokError` message: its first line (or its type's
    name when it has no message; a KeyError as the missing key), cut to `limit` characters."""
    if isinstance(exc, KeyError) and exc.args:
        return f"missing key {exc.args[0]!r}"
    errors = getattr(exc, "errors", None)  # pydantic's ValidationError: its first line is only a count
    if callable(errors) and type(exc).__name__ == "ValidationError":
        first = errors()[0]
        return one_line(ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}"), limit)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
