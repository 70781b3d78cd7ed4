"""The one user-facing exception type.

Anything a user can cause (a bad path, a bad config key, a NaN in their data)
raises :class:`VlsaeError` with a one-line message that says what is wrong and
how to fix it. The CLI catches exactly this type, prints the message on stderr
and exits with code 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class VlsaeError(Exception):
    """A problem with the user's input, not a bug in vlsae."""
