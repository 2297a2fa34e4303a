"""The base of every expected, user-facing error: the CLI prints it as one line (no traceback)."""


class AligntokError(Exception):
    """Bad input or a failed precondition; the message names the file, key or value at fault."""
