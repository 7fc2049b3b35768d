"""Errors the user can act on, for every layer to raise.

`UserError` is bad input or a missing resource that the person running a command can fix (a path
that does not exist, a key the server refuses, a plan that cannot fit). The CLI prints its
message as one line and exits non-zero; anything else is a bug and keeps its traceback. It is a
`ValueError`, so code that already handles bad values handles it too.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message says what is wrong and what to do."""
