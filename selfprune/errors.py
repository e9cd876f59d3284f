"""User-facing errors: one line that names what is wrong and how to fix it."""


class SelfpruneError(Exception):
    """Raised for bad input; the CLI prints it as a single line and exits non-zero."""
