"""The one error type users see for bad input (exit code 2)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad config, data, model dir or CLI input.

    Raised before any process group starts; the CLI prints the message and exits with
    :data:`EXIT_USAGE`. The message must name the file/line or key and say how to fix it.
    """


EXIT_USAGE = 2
