"""The one exception type for bad input: the CLI prints its message and exits non-zero (no traceback)."""


class NanoGPTError(ValueError):
    """Something the user gave us is wrong; the message says what and how to fix it."""
